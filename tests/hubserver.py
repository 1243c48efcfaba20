"""A small Hub-compatible HTTP server, so tests can drive the real `huggingface_hub` client.

Standard library only. It keeps repos in memory as git-like commits (full file snapshots) and
implements just the endpoints the client calls to read model info, trees (with sub-folders)
and commit histories (paged, newest first), download files
(HEAD, GET, ranges), create a repo, create a branch, preupload, commit (NDJSON, base64 "regular"
files only: every preupload answer is "regular", so no LFS or Xet is involved), validate a card's
YAML, list refs and say who a token belongs to. Errors carry the headers the client keys on
(`X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`, `X-Error-Message`), so the client
raises its own exception types, as against the real Hub.

Auth: `tokens` maps a token to (user, can_write). Writes need a write token of the namespace's
owner or of a member of the organization (`orgs`); private repos are readable the same way.
Bound to 127.0.0.1 on an ephemeral port; `stop()` (or leaving the `with` block) shuts it down.
Every request is logged (`requests`) so tests can assert what was, and was not, downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        """Branch, tag, full commit sha or a unique sha prefix (7+ hex digits)."""
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if rev in self.commits:
            return self.commits[rev]
        if len(rev) >= 7:
            found = [c for sha, c in self.commits.items() if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass
class Request:
    method: str
    path: str  # decoded, without the query string
    query: dict[str, list[str]]
    status: int
    user: str | None
    range: str | None


class HubError(Exception):
    """An HTTP error answer: status, message and the X-Error-Code the client understands."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


class FakeHub:
    """The store plus the server. Use as a context manager, or call start() and stop()."""

    def __init__(self, tokens: dict[str, tuple[str, bool]] | None = None,
                 orgs: dict[str, set[str]] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.page_size = 50  # commits per page of a history (the Hub's default)
        self.tree_page_size = 1000  # entries per page of a tree listing (the Hub's default)
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- server life ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- store API for tests -------------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            first = self._new_commit(None, "initial commit",
                                     {".gitattributes": b"*.safetensors filter=lfs diff=lfs "
                                                        b"merge=lfs -text\n"})
            repo.commits[first.sha] = first
            repo.branches["main"] = first.sha
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
               message: str = "upload", deletions: tuple[str, ...] = ()) -> str:
        """Add `files` (path -> content) on top of `branch` (created from main if new)."""
        with self.lock:
            repo = self.create_repo(repo_id)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            head = repo.commits[repo.branches[branch]]
            snapshot = {k: v for k, v in head.files.items() if k not in deletions}
            snapshot.update(files)
            new = self._new_commit(head.sha, message, snapshot)
            repo.commits[new.sha] = new
            repo.branches[branch] = new.sha
            return new.sha

    def commit_folder(self, repo_id: str, folder: Path, *, branch: str = "main",
                      message: str = "upload folder") -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, branch=branch, message=message)

    def tag(self, repo_id: str, tag: str, rev: str = "main") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(rev)
            assert commit is not None, rev
            repo.tags[tag] = commit.sha
            return commit.sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            assert commit is not None, rev
            return dict(commit.files)

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of `branch`, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            out, sha = [], repo.branches.get(branch)
            while sha is not None:
                commit = repo.commits[sha]
                out.append(commit)
                sha = commit.parent
            return out

    def file_requests(self, repo_id: str | None = None) -> list[Request]:
        """Every HEAD/GET of a file (`/{repo}/resolve/{rev}/{path}`)."""
        with self.lock:
            return [r for r in self.requests if "/resolve/" in r.path
                    and (repo_id is None or r.path.startswith(f"/{repo_id}/resolve/"))]

    def requested_files(self, repo_id: str | None = None, method: str | None = None) -> set[str]:
        """File paths that were HEAD-ed or fetched (with `method`, only those)."""
        out = set()
        for r in self.file_requests(repo_id):
            if method is None or r.method == method:
                out.add(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- internals -----------------------------------------------------------------------------

    def _new_commit(self, parent: str | None, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{parent}\n{message}\n{next(self._counter)}\n".encode())
        for name in sorted(files):
            digest.update(f"{name}\0{git_blob_sha1(files[name])}\n".encode())
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return Commit(digest.hexdigest(), parent, message, dict(files), date)

    def user_of(self, auth: str | None) -> tuple[str | None, bool]:
        """(user, can_write) for an Authorization header; HubError 401 for an unknown token."""
        if not auth:
            return None, False
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def may_access(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and not self.may_access(user, repo_id.split("/")[0]):
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None, can_write: bool) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self.readable(repo_id, user)
        if not (can_write and self.may_access(user, repo_id.split("/")[0])):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the hub keeps its own log

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        body = self._read_body()
        user = None
        try:
            user, can_write = self.hub.user_of(self.headers.get("Authorization"))
            status, headers, payload = self._route(method, segments, query, body, user, can_write)
        except HubError as err:
            status, payload = err.status, json.dumps({"error": err.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message,
                       **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
        with self.hub.lock:
            self.hub.requests.append(Request(method, "/" + "/".join(segments), query, status,
                                             user, self.headers.get("Range")))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _route(self, method: str, seg: list[str], query: dict[str, list[str]], body: bytes,
               user: str | None, can_write: bool) -> tuple[int, dict[str, str], bytes]:
        hub = self.hub
        with hub.lock:
            if seg[:2] == ["api", "whoami-v2"] and method == "GET":
                if user is None:
                    raise HubError(401, "Invalid username or password.")
                orgs = [{"name": o} for o, members in hub.orgs.items() if user in members]
                role = "write" if can_write else "read"
                return self._json({"type": "user", "name": user, "fullname": user, "orgs": orgs,
                                   "auth": {"type": "access_token",
                                            "accessToken": {"displayName": "test",
                                                            "role": role}}})
            if seg[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if seg[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"), user, can_write)
            if len(seg) >= 4 and seg[:2] == ["api", "models"]:
                return self._api_model(method, "/".join(seg[2:4]), seg[4:], query, body, user,
                                       can_write)
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, "/".join(seg[:2]), seg[3], "/".join(seg[4:]), user)
        raise HubError(404, f"not implemented by the test hub: {method} {self.path}")

    # -- endpoints -----------------------------------------------------------------------------

    def _create_repo(self, payload: dict, user: str | None, can_write: bool):
        hub = self.hub
        if user is None:
            raise HubError(401, "Invalid username or password.")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not (can_write and hub.may_access(user, namespace)):
            raise HubError(403, f"You don't have the rights to create a model under the "
                                f"namespace \"{namespace}\"")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "the test hub only hosts models")
        url = f"{hub.url}/{repo_id}"
        if repo_id in hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        hub.create_repo(repo_id, private=payload.get("visibility") == "private"
                        or bool(payload.get("private")))
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _api_model(self, method: str, repo_id: str, rest: list[str], query, body: bytes,
                   user: str | None, can_write: bool):
        hub = self.hub
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = hub.readable(repo_id, user)
            rev = rest[1] if len(rest) > 1 else "main"
            return self._model_info(repo, self._commit(repo, rev), query)
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            repo = hub.readable(repo_id, user)
            commit = self._commit(repo, rest[1])
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            entries = self._tree(commit, "/".join(rest[2:]), recursive)
            start = int(query.get("cursor", ["0"])[0])  # the Hub pages trees with a cursor
            status, headers, payload = self._json(entries[start:start + hub.tree_page_size])
            if start + hub.tree_page_size < len(entries):
                url = f"{hub.url}/api/models/{repo_id}/tree/{'/'.join(rest[1:])}"
                headers["Link"] = (f'<{url}?recursive={str(recursive).lower()}'
                                   f'&cursor={start + hub.tree_page_size}>; rel="next"')
            return status, headers, payload
        if method == "GET" and rest[:1] == ["commits"] and len(rest) >= 2:
            repo = hub.readable(repo_id, user)
            return self._commits(repo, "/".join(rest[1:]), query)
        if method == "GET" and rest == ["refs"]:
            repo = hub.readable(repo_id, user)
            return self._json({
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                             for b, s in repo.branches.items()],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                         for t, s in repo.tags.items()],
                "converts": [],
            })
        if method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo = hub.readable(repo_id, user)
            commit = self._commit(repo, rest[1])
            paths = _paths_from_body(body, self.headers.get("Content-Type", ""))
            return self._json([e for e in self._tree(commit, "", True) if e["path"] in paths])
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            repo = hub.writable(repo_id, user, can_write)
            branch = self._branch(repo, rest[1])
            head = repo.commits[repo.branches[branch]]
            files = json.loads(body)["files"]
            return self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha1(head.files[f["path"]]) if f["path"] in head.files else None}
                for f in files
            ], "commitOid": head.sha})
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            repo = hub.writable(repo_id, user, can_write)
            return self._commit_ndjson(repo, self._branch(repo, rest[1]), body)
        if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            repo = hub.writable(repo_id, user, can_write)
            name = rest[1]
            if name in repo.branches:
                raise HubError(409, "Reference already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[name] = self._commit(repo, start).sha
            return self._json({})
        raise HubError(404, f"not implemented by the test hub: {method} {self.path}")

    def _commits(self, repo: Repo, rev: str, query):
        """A branch's history, newest first, a page at a time with a `Link: rel="next"` header,
        as the Hub pages `/api/models/{repo}/commits/{rev}` (`?p=N`)."""
        history, commit = [], self._commit(repo, rev)
        while commit is not None:
            history.append(commit)
            commit = repo.commits[commit.parent] if commit.parent else None
        page = int(query.get("p", ["0"])[0])
        size = self.hub.page_size
        items = [{"id": c.sha, "title": c.message.split("\n", 1)[0],
                  "message": c.message.partition("\n")[2], "date": c.date,
                  "authors": [{"user": "trainer", "avatar": ""}]}
                 for c in history[page * size:(page + 1) * size]]
        status, headers, payload = self._json(items)
        if (page + 1) * size < len(history):
            base = f"{self.hub.url}/api/models/{repo.repo_id}/commits/{quote(rev, safe='')}"
            headers["Link"] = f'<{base}?p={page + 1}>; rel="next"'
        return status, headers, payload

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _branch(self, repo: Repo, rev: str) -> str:
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return rev

    def _model_info(self, repo: Repo, commit: Commit, query):
        blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for name, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        return self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": namespace,
            "sha": commit.sha, "lastModified": commit.date, "createdAt": commit.date,
            "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "siblings": siblings,
        })

    @staticmethod
    def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(commit.files.items()):
            if not name.startswith(base):
                continue
            parts = name[len(base):].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {
                        "type": "directory", "path": folder, "size": 0,
                        "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "size": len(data),
                                 "oid": git_blob_sha1(data)}
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        return list(entries.values())

    def _commit_ndjson(self, repo: Repo, branch: str, body: bytes):
        hub = self.hub
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != head.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "the test hub only takes base64 file content")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(folder)}
            elif key == "lfsFile":
                raise HubError(400, "the test hub takes no LFS files (preupload says regular)")
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
        message = header.get("summary") or "commit"
        new = hub._new_commit(head.sha, message, files)
        repo.commits[new.sha] = new
        repo.branches[branch] = new.sha
        return self._json({"success": True, "commitOid": new.sha,
                           "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{new.sha}",
                           "hookOutput": "", "pullRequestUrl": None})

    def _resolve(self, method: str, repo_id: str, rev: str, path: str, user: str | None):
        repo = self.hub.readable(repo_id, user)
        commit = self._commit(repo, rev)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound",
                           {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.sha,
        }
        wanted = self.headers.get("Range")
        if wanted and method == "GET":
            start, end = _parse_range(wanted, len(data))
            if start is None:
                raise HubError(416, "Range Not Satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            chunk = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            headers["Content-Length"] = str(len(chunk))
            return 206, headers, chunk
        headers["Content-Length"] = str(len(data))
        return 200, headers, data


def _parse_range(value: str, size: int) -> tuple[int | None, int]:
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None, 0
    first, _, last = spec.strip().partition("-")
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size else (None, 0)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return None, 0
    return start, end


def _paths_from_body(body: bytes, content_type: str) -> set[str]:
    if "json" in content_type:
        return set(json.loads(body or b"{}").get("paths", []))
    return set(parse_qs(body.decode()).get("paths", []))


def configure_client(monkeypatch: Any, endpoint: str, home: Path, *, token: str | None = None,
                     offline: bool = False) -> None:
    """Point this process's `huggingface_hub` (and its subprocesses) at `endpoint` and `home`.

    `huggingface_hub.constants` reads the environment once, at import: the environment is set for
    subprocesses and the already-imported constants are patched for this process.
    """
    from huggingface_hub import constants

    home = Path(home)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    host = urlsplit(endpoint).hostname or "127.0.0.1"
    base = endpoint.rstrip("/")
    patches = {
        "ENDPOINT": base,
        "HUGGINGFACE_CO_URL_TEMPLATE": base + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    for key, value in patches.items():
        if hasattr(constants, key):
            monkeypatch.setattr(constants, key, value)


def set_offline(monkeypatch: Any, offline: bool) -> None:
    """Toggle HF_HUB_OFFLINE for this process and its subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def iter_text_files(root: Path) -> Iterator[Path]:
    """Every file under `root` (helper for token-leak scans)."""
    yield from (p for p in sorted(Path(root).rglob("*")) if p.is_file())
