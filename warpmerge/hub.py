"""Hugging Face Hub inputs and outputs: resolve `org/name@rev` to a cached snapshot, push a folder.

Everything here goes through the real `huggingface_hub` client, so the standard cache
(`HF_HUB_CACHE` / `HF_HOME`), `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_TOKEN` behave exactly as they
do for `transformers`. `huggingface_hub` is imported inside the functions only: `warpmerge --help`
and local-only merges must not pay for it.

Every failure leaves as a `HubError` (exit code 3) carrying one line that says what to do. Tokens
are never put into a message: the client's own messages are not echoed verbatim, and what little
of them we quote is scrubbed of the token first.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .errors import HubError, InputError
from .modelfolder import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)


# What a merge reads or copies besides the weights. Top-level files only: sub-folders of model
# repos hold other formats ("original/", "onnx/", ...) that a merge never needs.
AUX_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "*.model",  # sentencepiece
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "README.md",  # only read, for the init's license
)
# Never downloaded, even if an allow pattern above matched them: pickles can run code on load
# and optimizer states are many times the size of the model.
DENY_PATTERNS: tuple[str, ...] = (
    "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack", "*.npy",
    "optimizer*", "scheduler*", "rng_state*", "training_args*", "trainer_state*",
)
# The small files a dry run fetches to validate a Hub input without its weights.
DRY_RUN_FILES: tuple[str, ...] = ("config.json", "generation_config.json", INDEX_FILE, "README.md")
# Remote files a push replaces wholesale: whatever of these the folder no longer has is deleted,
# so a re-push with fewer shards leaves no stale shard behind.
STALE_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")

_NAME = r"[A-Za-z0-9_.\-]{1,96}"
_REPO_RE = re.compile(rf"({_NAME})/({_NAME})")
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
_FIRST_RANGE = 100_000  # one range request covers almost every header


def parse_repo_ref(ref: str) -> tuple[str, str | None] | None:
    """'org/name' or 'org/name@rev' -> (repo_id, revision); None if ref is not shaped like one.

    Shape only (the Hub's own repo-id rules): whether a local folder of that name exists is the
    caller's question, asked first, because a local folder wins over a repo id.
    """
    if not isinstance(ref, str):
        return None
    name, sep, revision = ref.strip().partition("@")
    if sep and (not revision or any(c.isspace() for c in revision)):
        return None
    match = _REPO_RE.fullmatch(name)
    if match is None:
        return None
    for part in match.groups():
        if part[0] in "-." or part[-1] in "-." or ".." in part or "--" in part:
            return None
    if name.endswith(".git"):
        return None
    return name, (revision or None)


@dataclass
class HubModel:
    """A Hub input, resolved and (unless a dry run) downloaded into the standard cache."""

    path: Path  # local snapshot folder holding the needed files
    repo_id: str
    revision: str | None  # what the user asked for
    commit: str  # resolved commit sha
    download_bytes: int  # bytes that were (or, with dry_run, would be) downloaded
    files: dict[str, int] = field(default_factory=dict)  # needed file -> size, weights last
    weight_files: list[str] = field(default_factory=list)  # the safetensors files, in order
    subfolder: str = ""  # where `path` lies inside the repo ("" for the root)

    @property
    def ref(self) -> str:
        """`org/name@revision` as the user wrote it (no revision: the default branch)."""
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


# ---------------------------------------------------------------------------------------------
# Download


def fetch_model(
    repo_id: str,
    revision: str | None,
    *,
    progress: bool = True,
    dry_run: bool = False,
) -> HubModel:
    """Download what a merge needs from `repo_id` at `revision` into the Hub cache.

    Only the weights a loader would read (the shards an index names, else `model.safetensors`,
    else the top-level `*.safetensors`) and the files of `AUX_PATTERNS` are fetched: never
    pickles, optimizer states or sub-folders. With `dry_run`, only `DRY_RUN_FILES` are fetched
    and `download_bytes` is what a real run would download; the weights' headers can then be
    read with `remote_headers`. Offline (`HF_HUB_OFFLINE=1`) or with the network down, a
    complete cached snapshot is used; otherwise a `HubError` says what to do.
    """
    hf = _hf()
    if _offline():
        return _from_cache(repo_id, revision, None)
    try:
        with _progress(progress):
            return _fetch_online(hf, repo_id, revision, dry_run=dry_run)
    except (HubError, InputError):
        raise
    except Exception as exc:  # classified below
        if _is_transient(exc):
            return _from_cache(repo_id, revision, exc)
        raise _hub_error(exc, repo_id=repo_id, revision=revision) from None


def _fetch_online(hf: Any, repo_id: str, revision: str | None, *, dry_run: bool) -> HubModel:
    api = hf.HfApi()
    target = revision
    for _ in range(3):  # a branch that moves while we download is re-planned at its new head
        info = api.model_info(repo_id, revision=target, files_metadata=True)
        commit = info.sha
        sizes = {
            s.rfilename: (s.lfs.size if s.lfs is not None else s.size) or 0
            for s in (info.siblings or [])
        }
        cached = {n for n in sizes if _cached(hf, repo_id, commit, n)}
        index = None
        if INDEX_FILE in sizes:  # small, and needed to know which shards to fetch
            index = hf.hf_hub_download(repo_id, INDEX_FILE, revision=commit)
        weights = _weight_files(list(sizes), index, repo_id)
        needed = _aux_files(list(sizes)) + ([INDEX_FILE] if index else []) + weights
        files = {name: sizes[name] for name in needed}
        download = sum(size for name, size in files.items() if name not in cached)
        wanted = [n for n in (DRY_RUN_FILES if dry_run else needed) if n in sizes]
        # Downloading by the user's revision (not the sha) records refs/<revision> in the cache,
        # which is what lets a later offline run find this snapshot.
        path = Path(
            hf.snapshot_download(
                repo_id, revision=target, allow_patterns=[glob.escape(n) for n in wanted]
            )
        )
        if path.name == commit:
            return HubModel(path, repo_id, revision, commit, download, files, weights)
        log.info("%s moved to %s while downloading; fetching that commit", repo_id, path.name)
        target = path.name
    raise HubError(f"{repo_id}@{revision}: the branch keeps moving while downloading; "
                   "pin a commit (org/name@<sha>) and retry")


def _weight_files(names: list[str], index: str | None, repo_id: str) -> list[str]:
    """The safetensors files a loader reads: the model-folder rules, over the repo's listing."""
    from .modelfolder import parse_index, weight_files

    weight_map = None
    if index is not None:
        try:
            text = Path(index).read_text(encoding="utf-8")
        except (OSError, ValueError):
            raise InputError(f"{repo_id}: {INDEX_FILE} is not a valid index") from None
        weight_map = parse_index(text, repo_id)
    shards = weight_files(names, weight_map, repo_id, f"the repo {repo_id}")
    missing = [s for s in shards if s not in names]
    if missing:
        raise InputError(f"{repo_id}: {INDEX_FILE} names {missing[0]}, which the repo lacks")
    return shards


def _aux_files(names: Iterable[str]) -> list[str]:
    return sorted(
        n for n in names
        if "/" not in n
        and any(fnmatchcase(n, p) for p in AUX_PATTERNS)
        and not any(fnmatchcase(n, p) for p in DENY_PATTERNS)
    )


def _cached(hf: Any, repo_id: str, commit: str, name: str) -> bool:
    return isinstance(hf.try_to_load_from_cache(repo_id, name, revision=commit), str)


def _from_cache(repo_id: str, revision: str | None, cause: BaseException | None) -> HubModel:
    """The cached snapshot of `repo_id@revision`, if complete; else a HubError saying why not."""
    hf = _hf()
    try:
        path = Path(
            hf.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                 allow_patterns=["config.json"])
        )
    except Exception:  # any miss means: not usable from the cache
        raise _cold_cache_error(repo_id, revision, cause) from None
    names = _cached_listing(hf, repo_id, path)
    index = path / INDEX_FILE if INDEX_FILE in names else None
    try:
        weights = _weight_files(names, str(index) if index else None, repo_id)
    except InputError:
        weights = []
    needed = _aux_files(names) + ([INDEX_FILE] if index else []) + weights
    missing = [n for n in weights + needed if not (path / n).exists()]  # weights named first
    if not weights or missing:
        what = missing[0] if missing else "the weights"
        raise _cold_cache_error(repo_id, revision, cause, lacks=what)
    files = {n: (path / n).stat().st_size for n in needed}
    return HubModel(path, repo_id, revision, path.name, 0, files, weights)


def _cached_listing(hf: Any, repo_id: str, snapshot: Path) -> list[str]:
    """File names of the repo at the snapshot's commit: the cached tree listing if there is one
    (it knows about files that never got downloaded), else what the snapshot folder holds."""
    get_tree = getattr(hf, "get_cached_repo_tree", None)
    if get_tree is not None:
        try:
            return [f.path for f in get_tree(repo_id, revision=snapshot.name)]
        except Exception:  # no listing cached: fall back to the folder
            pass
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Checkpoints as trainers push them: folders of one repo (hf://), and commit histories


HF_PREFIX = "hf://"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a merge reads of a checkpoint folder besides its weights: nothing of what trainers leave
# beside them (optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin) is ever fetched.
CHECKPOINT_FILES: tuple[str, ...] = ("config.json", "trainer_state.json", ADAPTER_CONFIG)
_GLOB = re.compile(r"[*?\[]")
_HF_PATH = re.compile(r"(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>refs/pr/\d+|[^/]*))?(?:/(?P<path>.*))?")


@dataclass(frozen=True)
class HubCheckpoint:
    """One checkpoint on the Hub, pinned: the folder `path` of `repo_id` at `commit`.

    `files` maps the names of the folder's own files (not of its sub-folders) to their sizes,
    as listed when the reference was resolved, so fetching it needs no second listing.
    """

    repo_id: str
    commit: str
    path: str = ""  # folder inside the repo; "" is the root
    revision: str | None = None  # what the user asked for (a branch, tag or commit)
    title: str | None = None  # the commit's title, for a checkpoint of a hub_history
    files: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ref(self) -> str:
        """The pinned `hf://` path: what provenance records."""
        return f"{HF_PREFIX}{self.repo_id}@{self.commit}" + (f"/{self.path}" if self.path else "")

    @property
    def name(self) -> str | None:
        """The folder's own name (None at the root: its local folder is named by the hash)."""
        return self.path.rsplit("/", 1)[-1] if self.path else None

    @property
    def short(self) -> str:
        """How messages name it: the folder name, else the commit title and short hash."""
        if self.name:
            return self.name
        return f"{self.title} @ {self.commit[:8]}" if self.title else f"{self.repo_id}@" \
            f"{self.commit[:8]}"


def parse_hf_path(ref: str) -> tuple[str, str | None, str] | None:
    """'hf://org/name@rev/path' -> (repo_id, revision, path); None if not an hf:// path.

    huggingface_hub's file-system form: the revision may be `refs/pr/N`, or any revision with
    its slashes percent-encoded. A malformed hf:// path is an InputError.
    """
    if not isinstance(ref, str) or not ref.startswith(HF_PREFIX):
        return None
    bad = InputError(f"{ref}: not a Hub path (hf://org/name[@revision][/folder])")
    match = _HF_PATH.fullmatch(ref[len(HF_PREFIX):].rstrip("/"))
    if match is None:
        raise bad
    revision = unquote(match["rev"]) if match["rev"] is not None else None
    parsed = parse_repo_ref(match["repo"] + (f"@{revision}" if revision is not None else ""))
    path = match["path"] or ""
    if parsed is None or (path and any(p in ("", ".", "..") for p in path.split("/"))):
        raise bad
    return parsed[0], parsed[1], path


def expand_checkpoints(specs: Iterable[Any]) -> list[Any]:
    """A run's checkpoint entries with every Hub entry resolved to pinned `HubCheckpoint`s.

    Local paths pass through untouched; an `hf://` path becomes its folder (a glob: every
    matching folder, naturally sorted), a `hub_history` its matching commits, oldest first.
    """
    out: list[Any] = []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith(HF_PREFIX):
            out.extend(resolve_hf_path(spec))
        elif hasattr(spec, "hub_history"):
            out.extend(resolve_history(spec.hub_history, spec.match, spec.revision))
        else:
            out.append(spec)
    return out


def checkpoint_name(ref: str | HubCheckpoint) -> str:
    """How messages name a checkpoint entry: a local folder's name, or `HubCheckpoint.short`."""
    return Path(ref).name if isinstance(ref, str) else ref.short


def resolve_hf_path(ref: str) -> list[HubCheckpoint]:
    """The folders an `hf://` path names: one, or for a glob every match, naturally sorted.

    Lists the repo's tree at the revision (from the listing cache when offline); a folder that
    does not exist, or a glob that matches none, is an InputError naming the path.
    """
    from .config import natural_key

    parsed = parse_hf_path(ref)
    if parsed is None:
        raise InputError(f"{ref}: not a Hub path (hf://org/name[@revision][/folder])")
    repo_id, revision, path = parsed
    parts = path.split("/") if path else []
    fixed = next((i for i, p in enumerate(parts) if _GLOB.search(p)), len(parts))
    base = "/".join(parts[:fixed])
    commit, files = _tree(repo_id, revision, base)
    folders = {f.rsplit("/", 1)[0] if "/" in f else "" for f in files}
    if fixed == len(parts):
        matched = [path] if path in folders else []
    else:
        matched = sorted((f for f in folders if _folder_matches(f, parts)), key=natural_key)
    if not matched:
        what = "matches no folder" if fixed < len(parts) else "is not a folder with files"
        raise InputError(f"{ref}: {what} in {repo_id}@{revision or 'main'} "
                         f"(commit {commit[:12]})")
    return [HubCheckpoint(repo_id, commit, folder, revision, None, _children(files, folder))
            for folder in matched]


def hub_model(ref: str) -> HubCheckpoint:
    """The one folder an `hf://` path names where one model is expected (the init, `check`)."""
    found = resolve_hf_path(ref)
    if len(found) != 1 or _GLOB.search(ref):
        raise InputError(f"{ref}: names {len(found)} folders where one model is expected")
    return found[0]


def resolve_history(repo_id: str, match: str, revision: str | None = None
                    ) -> list[HubCheckpoint]:
    """Every commit of branch `revision` whose title matches `match`, oldest first, each pinned
    to its hash with the weights at the repo root (TRL `hub_strategy="every_save"`)."""
    commits = _history(repo_id, revision)
    picked = [c for c in reversed(commits) if fnmatchcase(c["title"], match)]
    where = f"hub_history {repo_id}@{revision or 'main'}"
    if not picked:
        newest = f"; the newest is {commits[0]['title']!r}" if commits else ""
        raise InputError(f"{where}: no commit title matches {match!r} "
                         f"({len(commits)} commit(s){newest})")
    out = []
    for c in picked:
        _, files = _tree(repo_id, c["commit"], "")
        out.append(HubCheckpoint(repo_id, c["commit"], "", revision, c["title"],
                                 _children(files, "")))
    return out


def fetch_checkpoint(ckpt: HubCheckpoint, *, model_files: bool = False, progress: bool = True,
                     dry_run: bool = False) -> HubModel:
    """Download what a merge reads of one Hub checkpoint folder into the standard cache.

    That is its weights (the shards an index names, `model.safetensors`, or for a PEFT folder
    `adapter_model.safetensors`) and `CHECKPOINT_FILES`; with `model_files` (the init), also
    the tokenizer and card files of `AUX_PATTERNS`. Nothing else: no optimizer, scheduler, rng
    or training-args files. With `dry_run`, no weights (read their headers with
    `remote_weight_headers`). Files are fetched by commit hash, so a warm cache needs no network.
    """
    hf = _hf()
    names = list(ckpt.files)
    small = [n for n in names if n in CHECKPOINT_FILES or n == INDEX_FILE
             or (model_files and n in _aux_files(names))]
    try:
        with _progress(progress):
            cached = {n for n in names if _cached(hf, ckpt.repo_id, ckpt.commit, _join(ckpt, n))}
            local = {n: Path(hf.hf_hub_download(ckpt.repo_id, _join(ckpt, n),
                                                revision=ckpt.commit)) for n in small}
            if ADAPTER_CONFIG in names:
                if ADAPTER_WEIGHTS not in names:
                    raise InputError(f"{ckpt.ref}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
                weights = [ADAPTER_WEIGHTS]
            else:
                index = str(local[INDEX_FILE]) if INDEX_FILE in local else None
                weights = _weight_files(names, index, ckpt.ref)
            files = {n: ckpt.files[n] for n in [*small, *weights]}
            download = sum(size for n, size in files.items() if n not in cached)
            if not dry_run or ADAPTER_CONFIG in names:  # adapters are small: read whole
                for n in weights:
                    hf.hf_hub_download(ckpt.repo_id, _join(ckpt, n), revision=ckpt.commit)
    except (HubError, InputError):
        raise
    except Exception as exc:
        if isinstance(exc, _errors("OfflineModeIsEnabled", "LocalEntryNotFoundError")):
            raise _cold_cache_error(ckpt.repo_id, ckpt.commit, exc if not _offline() else None,
                                    lacks=f"files of {ckpt.path or 'the root'}") from None
        raise _hub_error(exc, repo_id=ckpt.repo_id, revision=ckpt.commit) from None
    folder = _snapshot(ckpt.repo_id, ckpt.commit) / ckpt.path
    return HubModel(folder, ckpt.repo_id, ckpt.revision, ckpt.commit, download, files, weights,
                    subfolder=ckpt.path)


def remote_weight_headers(model: HubModel) -> dict[str, tuple[bytes, int]]:
    """(raw header, file size) of each weight file of `model` not on disk (after a dry run)."""
    missing = [f for f in model.weight_files if not (model.path / f).exists()]
    if not missing:
        return {}
    prefix = f"{model.subfolder}/" if model.subfolder else ""
    raw = remote_header_bytes(model.repo_id, model.commit, [prefix + f for f in missing])
    return {name: (raw[prefix + name], model.files[name]) for name in missing}


def _join(ckpt: HubCheckpoint, name: str) -> str:
    return f"{ckpt.path}/{name}" if ckpt.path else name


def _snapshot(repo_id: str, commit: str) -> Path:
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _folder_matches(folder: str, pattern: list[str]) -> bool:
    parts = folder.split("/") if folder else []
    return len(parts) == len(pattern) and all(
        fnmatchcase(p, q) for p, q in zip(parts, pattern, strict=True))


def _children(files: dict[str, int], folder: str) -> dict[str, int]:
    """The files directly inside `folder`, by name."""
    prefix = f"{folder}/" if folder else ""
    return {f[len(prefix):]: size for f, size in files.items()
            if f.startswith(prefix) and "/" not in f[len(prefix):]}


# Listings and histories, cached for offline reruns. They live in huggingface_hub's assets cache
# (HF_ASSETS_CACHE, by default $HF_HOME/assets/warpmerge/<org>--<name>/listings/), one small
# JSON file per question asked of the Hub. Online, a question about a branch is always asked
# again (branches move); about a commit hash, the cached answer is used (commits do not).


def _tree(repo_id: str, revision: str | None, folder: str) -> tuple[str, dict[str, int]]:
    """(commit, {file path: size}) of every file under `folder` at `revision`."""

    def ask(api: Any) -> dict:
        commit = api.model_info(repo_id, revision=revision).sha
        try:
            entries = list(api.list_repo_tree(repo_id, path_in_repo=folder or None,
                                              revision=commit, recursive=True))
        except _errors("RemoteEntryNotFoundError", "EntryNotFoundError"):
            entries = []  # no such folder: the caller names the path
        files = {e.path: int(getattr(e, "size", 0) or 0) for e in entries
                 if type(e).__name__ == "RepoFile"}
        return {"commit": commit, "files": files}

    answer = _ask_cached(repo_id, revision, f"tree {revision or ''} {folder}", ask)
    return answer["commit"], answer["files"]


def _history(repo_id: str, revision: str | None) -> list[dict[str, str]]:
    """[{"commit", "title"}] of the branch, newest first (as the Hub lists them)."""

    def ask(api: Any) -> dict:
        commits = api.list_repo_commits(repo_id, revision=revision)
        return {"commits": [{"commit": c.commit_id, "title": c.title} for c in commits]}

    return _ask_cached(repo_id, revision, f"commits {revision or ''}", ask)["commits"]


def _ask_cached(repo_id: str, revision: str | None, key: str, ask: Any) -> dict:
    """`ask(api)`'s answer, kept in the listing cache; the cached one offline or when the Hub
    cannot be reached (a HubError when there is none)."""
    hf = _hf()
    path = _listing_path(repo_id, key)
    pinned = revision is not None and _SHA_RE.fullmatch(revision) is not None
    if _offline() or (pinned and path.is_file()):
        return _read_listing(path, repo_id, revision, None)
    try:
        answer = ask(hf.HfApi())
    except (HubError, InputError):
        raise
    except Exception as exc:
        if _is_transient(exc):
            return _read_listing(path, repo_id, revision, exc)
        raise _hub_error(exc, repo_id=repo_id, revision=revision) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, **answer}))
    os.replace(tmp, path)
    return answer


def _listing_path(repo_id: str, key: str) -> Path:
    import hashlib

    from huggingface_hub import constants

    folder = _hf().cached_assets_path("warpmerge", namespace=repo_id, subfolder="listings",
                                      assets_dir=constants.HF_ASSETS_CACHE)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_listing(path: Path, repo_id: str, revision: str | None,
                  cause: BaseException | None) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise _cold_cache_error(repo_id, revision, cause, listing=True) from None


def remote_headers(
    repo_id: str, commit: str, files: Iterable[str] | None = None
) -> dict[str, dict]:
    """The safetensors JSON header of each weight file at `commit`, without the tensor data.

    A cached file is read locally; otherwise two HTTP range requests at most per file. `files`
    defaults to the shards named by the cached index, else `model.safetensors`. This is what a
    dry run validates shapes from, so that it never downloads weights.
    """
    headers: dict[str, dict] = {}
    for name, raw in remote_header_bytes(repo_id, commit, files).items():
        try:
            headers[name] = json.loads(raw)
        except ValueError as exc:
            raise InputError(f"{repo_id}: {name} has no valid safetensors header ({exc})") from None
    return headers


def remote_header_bytes(
    repo_id: str, commit: str, files: Iterable[str] | None = None
) -> dict[str, bytes]:
    """Like `remote_headers`, but the raw JSON bytes (to hash them as a local read would)."""
    hf = _hf()
    if files is None:
        index = hf.try_to_load_from_cache(repo_id, INDEX_FILE, revision=commit)
        if isinstance(index, str):
            files = _weight_files(_local_index_shards(index), index, repo_id)
        else:
            files = [SINGLE_FILE]
    out: dict[str, bytes] = {}
    for name in files:
        local = hf.try_to_load_from_cache(repo_id, name, revision=commit)
        try:
            if isinstance(local, str):
                out[name] = _local_header(Path(local))
            else:
                out[name] = _remote_header(hf, repo_id, commit, name)
        except (HubError, InputError):
            raise
        except (ValueError, struct.error) as exc:
            raise InputError(f"{repo_id}: {name} has no valid safetensors header ({exc})") from None
        except Exception as exc:
            raise _hub_error(exc, repo_id=repo_id, revision=commit) from None
    return out


def _local_index_shards(index: str) -> list[str]:
    """Every shard an index names, taken as present (a dry run checks them remotely)."""
    try:
        return list(json.loads(Path(index).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _local_header(path: Path) -> bytes:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER:
            raise ValueError("header too large")
        return f.read(length)


def _remote_header(hf: Any, repo_id: str, commit: str, name: str) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf.hf_hub_url(repo_id, name, revision=commit)
    base = build_hf_headers()
    response = get_session().get(url, headers={**base, "Range": f"bytes=0-{_FIRST_RANGE - 1}"})
    hf_raise_for_status(response)
    content = response.content
    (length,) = struct.unpack("<Q", content[:8])
    if length > _MAX_HEADER:
        raise ValueError("header too large")
    if len(content) >= 8 + length:
        return content[8:8 + length]
    response = get_session().get(url, headers={**base, "Range": f"bytes=8-{length + 7}"})
    hf_raise_for_status(response)
    return response.content[:length]


def read_license(model_path: Path) -> str | None:
    """The `license` of a model card's front matter (`README.md` in `model_path`), if any.

    `other` licenses come back as their `license_name` when the card gives one, so the merged
    card can still name the license it inherits.
    """
    readme = Path(model_path) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):  # no metadata block (the client would say so on stderr)
        return None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except Exception:  # a broken card just has no license we can use
        return None
    license = getattr(data, "license", None)
    if isinstance(license, list):
        license = license[0] if license else None
    if license == "other" and getattr(data, "license_name", None):
        return str(data.license_name)
    return str(license) if license else None


def hub_cache_dir() -> Path:
    """Where downloads land (the standard cache: HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# ---------------------------------------------------------------------------------------------
# Upload


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    progress: bool = True,
) -> str:
    """Push `folder` to `repo_id` in one commit and return the URL to show.

    Creates the repo (private if asked; an existing repo keeps its visibility) and the branch
    if needed. Remote weight files the folder no longer has (`STALE_PATTERNS`, top level) are
    deleted in the same commit, so a re-push with a different shard count leaves no stale shard.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"push: folder not found: {folder}")
    local = _local_files(folder)
    if not local:
        raise InputError(f"push: {folder} has no files to push")
    if parse_repo_ref(repo_id) is None or "@" in repo_id:
        raise InputError(f"push: {repo_id!r} is not a repo id (user/name or org/name)")
    hf = _hf()
    if _offline():
        raise HubError("cannot push while HF_HUB_OFFLINE is set: unset it and retry")
    if not _has_token():
        raise HubError("pushing needs a Hub token with write access: set HF_TOKEN or run "
                       "`hf auth login`")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    branch = revision or "main"
    try:
        with _progress(progress):
            api = hf.HfApi()
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            remote = api.list_repo_files(repo_id, revision=branch)
            stale = [
                name for name in remote
                if "/" not in name and name not in local
                and any(fnmatchcase(name, p) for p in STALE_PATTERNS)
            ]
            operations: list[Any] = [CommitOperationDelete(path_in_repo=n) for n in stale]
            operations += [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                for name, path in local.items()
            ]
            from . import __version__

            api.create_commit(
                repo_id,
                operations=operations,
                commit_message=message or f"Upload WARP merge (warpmerge {__version__})",
                revision=branch,
            )
    except (HubError, InputError):
        raise
    except Exception as exc:
        raise _hub_error(exc, repo_id=repo_id, revision=revision, writing=True) from None
    url = f"{api.endpoint.rstrip('/')}/{repo_id}"
    return url if branch == "main" else f"{url}/tree/{quote(branch, safe='')}"


def _local_files(folder: Path) -> dict[str, Path]:
    """Repo path -> local file, hidden files and folders (.git, .cache, ...) left out."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path
    return files


# ---------------------------------------------------------------------------------------------
# Errors and helpers


def _hf() -> Any:
    """The lazily imported client (kept out of CLI start-up)."""
    import huggingface_hub

    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _has_token() -> bool:
    try:
        return bool(_hf().get_token())
    except Exception:  # a broken token source is no token
        return False


@contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """Hub progress bars on (the default) or off for the block."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if enabled or are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable_progress_bars()


def _network_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError", "TimeoutException")),
                          ("httpx", ("TransportError", "TimeoutException")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        kinds += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(kinds)


class _Never(Exception):
    """Stands for an error class this version of huggingface_hub does not have."""


def _errors(*names: str) -> tuple[type[BaseException], ...]:
    """huggingface_hub's error classes by name, across versions (missing ones match nothing)."""
    from huggingface_hub import errors, utils

    return tuple(getattr(errors, n, None) or getattr(utils, n, None) or _Never for n in names)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    """Network down, offline, or the Hub unavailable: worth trying the cache instead."""
    if isinstance(exc, _errors("OfflineModeIsEnabled", "LocalEntryNotFoundError")):
        return True
    if isinstance(exc, _errors("HfHubHTTPError")):
        status = _status(exc)
        return status is not None and (status >= 500 or status in (408, 429))
    return isinstance(exc, _network_errors())


def _cold_cache_error(repo_id: str, revision: str | None, cause: BaseException | None,
                      lacks: str | None = None, listing: bool = False) -> HubError:
    ref = f"{repo_id}@{revision}" if revision else repo_id
    cause = _root_cause(cause)
    state = f"the cached snapshot of {ref} lacks {lacks}" if lacks else \
        f"{ref} was never listed online (no cached listing)" if listing else \
        f"{ref} is not in the local Hub cache"
    if cause is None:
        return HubError(f"{state} and HF_HUB_OFFLINE is set: run once online (unset "
                        "HF_HUB_OFFLINE) to download it, or use a local folder")
    if isinstance(cause, _network_errors()) and not _status(cause):
        return HubError(f"cannot reach the Hub at {_endpoint()} and {state}: check your network "
                        "connection (and HF_ENDPOINT), or use a local folder")
    return HubError(f"the Hub is unavailable ({_status(cause) or type(cause).__name__}) and "
                    f"{state}: retry later")


def _root_cause(exc: BaseException | None) -> BaseException | None:
    """The network or HTTP error behind the client's "not in the cache" wrappers."""
    seen = 0
    while isinstance(exc, _errors("LocalEntryNotFoundError")) and seen < 5:
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc, seen = inner, seen + 1
    return exc


def _hub_error(exc: BaseException, *, repo_id: str, revision: str | None = None,
               writing: bool = False) -> HubError:
    """One actionable line for any failure of the client (never containing the token)."""
    ref = f"{repo_id}@{revision}" if revision else repo_id
    status = _status(exc)
    token = _has_token()
    if isinstance(exc, _errors("GatedRepoError")):
        return HubError(f"{repo_id} is gated: accept its conditions at {_endpoint()}/{repo_id} "
                        "and use a token of that account (HF_TOKEN)")
    if isinstance(exc, _errors("RevisionNotFoundError")):
        return HubError(f"{repo_id}: revision {revision!r} not found: use an existing branch, "
                        "tag or commit (org/name@REVISION)")
    if isinstance(exc, _errors("RepositoryNotFoundError")):
        if writing:
            return HubError(f"{repo_id}: repository not found and could not be created: check "
                            "the repo id and that your token may write to its namespace")
        if not token:
            return HubError(f"{repo_id}: repository not found, or private/gated: check the repo "
                            "id, or set HF_TOKEN (or run `hf auth login`) to read private repos")
        return HubError(f"{repo_id}: repository not found, or your token has no access to it: "
                        "check the repo id and the token's permissions")
    if isinstance(exc, _errors("RemoteEntryNotFoundError")):
        return HubError(f"{ref}: a file is missing on the Hub ({_clean(exc)})")
    if isinstance(exc, _errors("OfflineModeIsEnabled")):
        return HubError("HF_HUB_OFFLINE is set: unset it to reach the Hub, or use cached models")
    if isinstance(exc, _errors("LocalEntryNotFoundError")):
        return _cold_cache_error(repo_id, revision, exc.__cause__ or exc.__context__)
    if status == 401:
        if not token:
            return HubError(f"{ref}: the Hub needs a token: set HF_TOKEN (or run "
                            "`hf auth login`)" + (" with write access" if writing else ""))
        return HubError(f"{ref}: the Hub rejected your token (401): set HF_TOKEN to a valid "
                        "token" + (" with write access" if writing else ""))
    if status == 403:
        if writing:
            return HubError(f"{repo_id}: your token may not write there (403 Forbidden): use a "
                            "write token of the owner or of a member of that organization")
        return HubError(f"{ref}: access denied (403 Forbidden): use a token with read access")
    if status == 429:
        return HubError(f"{ref}: rate-limited by the Hub (429): wait a while and retry")
    if status is not None and status >= 500:
        return HubError(f"{ref}: the Hub is unavailable ({status}): retry later")
    if status is not None:
        return HubError(f"{ref}: the Hub answered {status} ({_clean(exc)})")
    if isinstance(exc, _network_errors()):
        return HubError(f"cannot reach the Hub at {_endpoint()} ({type(exc).__name__}): check "
                        "your network connection (and HF_ENDPOINT), or use a local folder")
    if isinstance(exc, ValueError) and "README.md" in str(exc):
        return HubError(f"{repo_id}: the Hub rejected the model card metadata ({_clean(exc)})")
    return HubError(f"{ref}: Hub operation failed: {type(exc).__name__}: {_clean(exc)}")


def _clean(exc: BaseException) -> str:
    """The server's message, or the first line of the error, token scrubbed, kept short."""
    text = getattr(exc, "server_message", None) or str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return scrub(first)[:200]


def scrub(text: str) -> str:
    """`text` with the current Hub token (and anything shaped like an hf_ token) masked."""
    token = None
    try:
        token = _hf().get_token()
    except Exception:
        pass
    for value in filter(None, (token, os.environ.get("HF_TOKEN"))):
        text = text.replace(value, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{30,}", "hf_***", text)  # Hub tokens: hf_ + 34 chars
