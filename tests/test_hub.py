"""Hub inputs and outputs against a local Hub-compatible server, with the real client.

`hubserver.FakeHub` runs on 127.0.0.1; `HF_ENDPOINT`, the cache and the token point at it and at
tmp folders, so nothing here touches the network or the user's cache. One opt-in test at the end
runs against the real Hub (WARPMERGE_LIVE_HUB=1 and HF_TOKEN).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import perturb, random_model, run_cli, write_model
from hubserver import FakeHub, configure_client, set_offline

from warpmerge import hub as wh
from warpmerge.errors import HubError, InputError

WRITE = "hf_writeTOKENfortests0123456789"
READ = "hf_readTOKENfortests0123456789ab"
BOB = "hf_bobTOKENfortests0123456789abc"

DECOYS = {
    "optimizer.pt": b"\x80\x04decoy optimizer state" * 64,
    "pytorch_model.bin": b"\x80\x04decoy pickle" * 64,
    "training_args.bin": b"\x80\x04decoy args",
    "rng_state.pth": b"\x80\x04decoy rng",
    "scheduler.pt": b"\x80\x04decoy scheduler",
    "trainer_state.json": b"{}",
    "original/consolidated.safetensors": b"decoy: not a top-level file",
    "global_step10/optim_states.pt": b"decoy deepspeed state",
}
AUX = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "special_tokens_map.json": b'{"bos_token": "<bos>"}',
    "generation_config.json": b'{"bos_token_id": 2, "eos_token_id": 1}',
    "README.md": b"---\nlicense: gemma\n---\n# tiny\n",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A started FakeHub, with this process's client pointed at it (no token yet)."""
    with FakeHub(tokens={WRITE: ("alice", True), READ: ("alice", False), BOB: ("bob", True)},
                 orgs={"acme": {"alice"}}) as server:
        configure_client(monkeypatch, server.url, tmp_path / "hf")
        yield server


def publish(hub: FakeHub, repo_id: str, folder: Path, *, private: bool = False,
            extra: dict[str, bytes] | None = None, branch: str = "main") -> str:
    """Put a model folder (plus decoys and tokenizer files) in the hub; returns the commit."""
    hub.create_repo(repo_id, private=private)
    files = {p.relative_to(folder).as_posix(): p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return hub.commit(repo_id, {**files, **AUX, **DECOYS, **(extra or {})}, branch=branch)


def header_of(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tree_bytes(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_model(tmp_path / "src" / "sharded", random_model(1), shards=2)


# --- repo refs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "expected"), [
    ("google/gemma-2-9b-it", ("google/gemma-2-9b-it", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
    ("runs/step-1000", ("runs/step-1000", None)),  # shaped like one: a local folder wins upstream
    ("./runs/a", None),
    ("/abs/path", None),
    ("a/b/c", None),
    ("name", None),
    ("org/name@", None),
    ("org/-bad", None),
    ("org/a..b", None),
    ("org/a--b", None),
    ("org/name.git", None),
    ("C:\\models\\x", None),
])
def test_parse_repo_ref(ref: str, expected) -> None:
    assert wh.parse_repo_ref(ref) == expected


@pytest.mark.parametrize(("ref", "expected"), [
    ("hf://org/name", ("org/name", None, "")),
    ("hf://org/name@main/checkpoint-*", ("org/name", "main", "checkpoint-*")),
    ("hf://org/name/runs/a/checkpoint-500", ("org/name", None, "runs/a/checkpoint-500")),
    ("hf://org/name@refs/pr/3/checkpoint-1", ("org/name", "refs/pr/3", "checkpoint-1")),
    ("hf://org/name@refs%2Fpr%2F3/checkpoint-1", ("org/name", "refs/pr/3", "checkpoint-1")),
    ("org/name", None),
    ("runs/hf:/x", None),
])
def test_parse_hf_path(ref: str, expected) -> None:
    assert wh.parse_hf_path(ref) == expected


@pytest.mark.parametrize("ref", ["hf://name", "hf://org/name@/x", "hf://org/name/../x",
                                 "hf://org//x", "hf://org/-bad/x"])
def test_parse_hf_path_rejects(ref: str) -> None:
    with pytest.raises(InputError, match="not a Hub path"):
        wh.parse_hf_path(ref)


# --- downloads -------------------------------------------------------------------------------


def test_fetch_downloads_only_what_a_merge_needs(hub: FakeHub, sharded: Path) -> None:
    commit = publish(hub, "acme/tiny", sharded)
    model = wh.fetch_model("acme/tiny", None, progress=False)

    assert model.commit == commit and model.repo_id == "acme/tiny" and model.revision is None
    assert model.path.name == commit
    weights = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert model.weight_files == weights
    expected = {"config.json", "model.safetensors.index.json", *weights, *AUX}
    assert set(model.files) == expected
    for name in expected:  # byte-identical to what was published
        assert (model.path / name).read_bytes() == hub.files("acme/tiny")[name]
    assert model.download_bytes == sum(len(hub.files("acme/tiny")[n]) for n in expected)

    touched = hub.requested_files("acme/tiny")
    assert touched <= expected
    assert not touched & set(DECOYS)
    assert not any((model.path / d).exists() for d in DECOYS)

    hub.clear_log()  # a second fetch downloads nothing
    again = wh.fetch_model("acme/tiny", None, progress=False)
    assert again.path == model.path and again.download_bytes == 0
    assert not hub.requested_files("acme/tiny", "GET")


def test_fetch_pinned_tag_branch_and_commit(hub: FakeHub, tmp_path: Path) -> None:
    old = write_model(tmp_path / "old", random_model(2))
    new = write_model(tmp_path / "new", random_model(3))
    first = publish(hub, "acme/runs", old)
    hub.tag("acme/runs", "v1")
    second = hub.commit_folder("acme/runs", new)
    dev = hub.commit_folder("acme/runs", old, branch="dev")

    for revision, commit, folder in (("v1", first, old), (first, first, old),
                                     (first[:10], first, old), (None, second, new),
                                     ("dev", dev, old)):
        model = wh.fetch_model("acme/runs", revision, progress=False)
        assert model.commit == commit and model.revision == revision
        assert (model.path / "model.safetensors").read_bytes() == \
            (folder / "model.safetensors").read_bytes()


def test_single_file_and_unindexed_repos(hub: FakeHub, tmp_path: Path) -> None:
    single = write_model(tmp_path / "single", random_model(4))
    publish(hub, "acme/single", single)
    assert wh.fetch_model("acme/single", None, progress=False).weight_files == \
        ["model.safetensors"]

    hub.create_repo("acme/pickles")
    hub.commit("acme/pickles", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"})
    with pytest.raises(InputError, match="safetensors"):
        wh.fetch_model("acme/pickles", None, progress=False)
    assert "pytorch_model.bin" not in hub.requested_files("acme/pickles")


def test_dry_run_reports_bytes_and_reads_headers_by_range(hub: FakeHub, sharded: Path) -> None:
    publish(hub, "acme/tiny", sharded)
    plan = wh.fetch_model("acme/tiny", "main", progress=False, dry_run=True)
    stored = hub.files("acme/tiny")
    assert plan.download_bytes == sum(len(stored[n]) for n in plan.files)
    got = hub.requested_files("acme/tiny", "GET")
    assert got <= set(wh.DRY_RUN_FILES)  # no weights, no tokenizer
    assert not any((plan.path / w).exists() for w in plan.weight_files)

    hub.clear_log()
    headers = wh.remote_headers("acme/tiny", plan.commit)
    assert set(headers) == set(plan.weight_files)
    for name, header in headers.items():
        assert header == header_of(sharded / name)
    reads = [r for r in hub.file_requests("acme/tiny") if r.method == "GET"]
    assert reads and all(r.range and r.status == 206 for r in reads)


    real = wh.fetch_model("acme/tiny", "main", progress=False)
    assert real.download_bytes == plan.download_bytes - sum(
        len(stored[n]) for n in wh.DRY_RUN_FILES if n in stored)


def test_remote_header_longer_than_the_first_range(hub: FakeHub, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "wide"
    folder.mkdir()
    tensors = {f"model.layers.{i}.weight_with_a_rather_long_name": torch.zeros(1)
               for i in range(3000)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    hub.create_repo("acme/wide")
    commit = hub.commit_folder("acme/wide", folder)
    assert (folder / "model.safetensors").stat().st_size > 100_000
    headers = wh.remote_headers("acme/wide", commit, ["model.safetensors"])
    assert headers["model.safetensors"] == header_of(folder / "model.safetensors")


def test_offline_warm_cache_works_cold_cache_fails(
    hub: FakeHub, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(hub, "acme/tiny", sharded)
    hub.tag("acme/tiny", "v1")
    online = wh.fetch_model("acme/tiny", "v1", progress=False)
    publish(hub, "acme/other", sharded)

    set_offline(monkeypatch, True)
    hub.clear_log()
    offline = wh.fetch_model("acme/tiny", "v1", progress=False)
    assert (offline.path, offline.commit) == (online.path, online.commit)
    assert offline.download_bytes == 0 and offline.weight_files == online.weight_files
    assert hub.requests == []

    with pytest.raises(HubError) as err:
        wh.fetch_model("acme/other", None, progress=False)
    assert err.value.exit_code == 3
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "acme/other" in message
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        wh.fetch_model("acme/tiny", "v2", progress=False)  # that ref was never cached


def test_offline_after_a_dry_run_says_the_weights_are_missing(
    hub: FakeHub, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(hub, "acme/tiny", sharded)
    wh.fetch_model("acme/tiny", None, progress=False, dry_run=True)
    set_offline(monkeypatch, True)
    with pytest.raises(HubError, match="lacks .*safetensors"):
        wh.fetch_model("acme/tiny", None, progress=False)


def test_network_down(hub: FakeHub, sharded: Path, monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path) -> None:
    publish(hub, "acme/tiny", sharded)
    warm = wh.fetch_model("acme/tiny", None, progress=False)
    publish(hub, "acme/other", sharded)

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    configure_client(monkeypatch, dead, tmp_path / "hf")
    again = wh.fetch_model("acme/tiny", None, progress=False)
    assert again.path == warm.path and again.download_bytes == 0
    with pytest.raises(HubError, match="cannot reach the Hub") as err:
        wh.fetch_model("acme/other", None, progress=False)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)


def test_download_errors_are_one_actionable_line(
    hub: FakeHub, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(hub, "acme/tiny", sharded)
    publish(hub, "alice/secret", sharded, private=True)

    cases = [
        ("acme/nope", None, None, "not found"),
        ("acme/tiny", "v9", None, "revision 'v9' not found"),
        ("alice/secret", None, None, "HF_TOKEN"),
        ("alice/secret", None, BOB, "no access"),
        ("alice/secret", None, "hf_unknownTOKEN123456789", "rejected your token"),
    ]
    for repo_id, revision, token, expected in cases:
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(HubError) as err:
            wh.fetch_model(repo_id, revision, progress=False)
        message = str(err.value)
        assert err.value.exit_code == 3
        assert expected in message, message
        assert "\n" not in message and "hf_" not in message

    monkeypatch.setenv("HF_TOKEN", READ)  # the owner's read token reads the private repo
    assert wh.fetch_model("alice/secret", None, progress=False).weight_files


@pytest.mark.slow
def test_a_fresh_process_takes_everything_from_the_environment(
    hub: FakeHub, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user's shell does: HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE, no patching."""
    import subprocess
    import sys

    publish(hub, "alice/secret", sharded, private=True)
    monkeypatch.setenv("HF_TOKEN", READ)
    script = ("from warpmerge import hub; m = hub.fetch_model('alice/secret', None, "
              "progress=False); print(m.commit, m.download_bytes)")

    def python() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ))

    done = python()
    assert done.returncode == 0, done.stderr
    commit, size = done.stdout.split()
    assert commit == hub.repos["alice/secret"].branches["main"] and int(size) > 0
    assert READ not in done.stdout + done.stderr
    set_offline(monkeypatch, True)
    hub.clear_log()
    done = python()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [commit, "0"] and hub.requests == []


def test_a_local_folder_wins_over_a_repo_id(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import warpmerge

    publish_setup(hub, warp_setup)
    publish(hub, "shadow/init", write_model(tmp_path / "decoy-init", random_model(99)))
    hub.clear_log()
    shutil.copytree(warp_setup["init"], tmp_path / "shadow" / "init")  # named like the repo
    cfg = write_config(tmp_path / "warp.yaml", "shadow/init", ["acme/run-a"], ["acme/run-b1"],
                       tmp_path / "out")
    out = warpmerge.run(cfg).outputs[0]
    assert not [r for r in hub.requests if "shadow" in r.path]  # read from the folder
    assert hub.requested_files("acme/run-a")  # no such folder: from the Hub
    prov = json.loads((out / "warpmerge.json").read_text())
    init = next(i for i in prov["inputs"] if i["role"] == "init")
    assert init["repo_id"] is None and init["commit"] is None


def test_read_license(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# x\n")
    assert wh.read_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: gemma\nlicense_link: https://ai.google.dev/gemma\n"
        "---\n")
    assert wh.read_license(tmp_path) == "gemma"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert wh.read_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert wh.read_license(tmp_path) is None
    assert wh.read_license(tmp_path / "missing") is None


# --- pushes ----------------------------------------------------------------------------------


def merged_folder(root: Path, seed: int, shards: int) -> Path:
    folder = write_model(root, random_model(seed), shards=shards)
    (folder / "README.md").write_text("---\ntags:\n- merge\n---\n# merged\n")
    (folder / "warpmerge.json").write_text(json.dumps({"eta": 0.3}))
    (folder / "tokenizer.json").write_text("{}")
    for figure in ("angles.png", "front.png"):  # the card shows them by relative path
        (folder / figure).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * seed)
    return folder


def test_push_creates_a_private_repo_byte_identical(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE)
    folder = merged_folder(tmp_path / "out", 5, shards=3)
    url = wh.push_folder(folder, "alice/merged", private=True, progress=False)

    assert url == f"{hub.url}/alice/merged"
    repo = hub.repos["alice/merged"]
    assert repo.private
    remote = hub.files("alice/merged")
    local = tree_bytes(folder)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert len(hub.history("alice/merged")) == 2  # the repo's first commit + one upload
    assert all(WRITE not in v.decode("latin-1") for v in remote.values())
    out = capsys.readouterr()
    assert WRITE not in out.out + out.err


def test_push_to_a_branch_then_repush_with_fewer_shards(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE)
    three = merged_folder(tmp_path / "three", 6, shards=3)
    wh.push_folder(three, "acme/merged", progress=False)
    assert hub.repos["acme/merged"].private is False

    other = merged_folder(tmp_path / "other", 7, shards=2)
    url = wh.push_folder(other, "acme/merged", revision="eta-0.5", message="eta 0.5",
                         progress=False)
    assert url == f"{hub.url}/acme/merged/tree/eta-0.5"
    on_branch = hub.files("acme/merged", "eta-0.5")
    assert {k: v for k, v in on_branch.items() if k != ".gitattributes"} == tree_bytes(other)
    assert hub.history("acme/merged", "eta-0.5")[0].message == "eta 0.5"
    assert {k for k in hub.files("acme/merged") if k.startswith("model")} == \
        {p.name for p in three.glob("model*")}  # main untouched

    one = merged_folder(tmp_path / "one", 8, shards=1)
    before = len(hub.history("acme/merged"))
    wh.push_folder(one, "acme/merged", progress=False)
    remote = hub.files("acme/merged")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == tree_bytes(one)
    assert not [k for k in remote if k.startswith("model-") or k.endswith(".index.json")]
    assert len(hub.history("acme/merged")) == before + 1  # one commit


def test_push_errors(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = merged_folder(tmp_path / "out", 9, shards=1)
    hub.create_repo("bob/theirs")
    cases = [
        (None, "alice/x", "needs a Hub token"),
        (READ, "alice/x", "may not write"),
        (WRITE, "bob/theirs", "may not write"),
        (WRITE, "bob/new", "may not write"),
        ("hf_unknownTOKEN123456789", "alice/x", "rejected your token"),
    ]
    for token, repo_id, expected in cases:
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(HubError) as err:
            wh.push_folder(folder, repo_id, progress=False)
        message = str(err.value)
        assert expected in message and "\n" not in message and "hf_" not in message, message
        assert err.value.exit_code == 3
    with pytest.raises(InputError):
        wh.push_folder(tmp_path / "missing", "alice/x", progress=False)
    monkeypatch.setenv("HF_TOKEN", WRITE)
    set_offline(monkeypatch, True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        wh.push_folder(folder, "alice/x", progress=False)


# --- whole merges and the command line -------------------------------------------------------


@pytest.fixture
def warp_setup(tmp_path: Path) -> dict[str, Path]:
    """An init and two runs of two checkpoints each, as local folders."""
    init = random_model(10)
    folders = {"init": write_model(tmp_path / "local" / "init", init, shards=2)}
    for r, seed in (("a", 20), ("b", 30)):
        for step in (1, 2):
            ckpt = perturb(init, seed + step, scale=0.02)
            folders[f"{r}{step}"] = write_model(tmp_path / "local" / f"{r}-step-{step}", ckpt)
    return folders


def write_config(path: Path, init: str, a: list[str], b: list[str], out: Path,
                 push: dict | None = None) -> Path:
    import yaml

    cfg = {
        "init": init,
        "policies": [{"name": "run-a", "checkpoints": a}, {"name": "run-b", "checkpoints": b}],
        "ema": {"mu": 0.3},
        "liti": {"eta": 0.5},
        "output": {"path": str(out), "push_to_hub": push},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def publish_setup(hub: FakeHub, folders: dict[str, Path]) -> dict[str, str]:
    """init at acme/init; run a as two commits of acme/run-a (step 1 tagged), run b as repos."""
    commits = {"init": publish(hub, "acme/init", folders["init"])}
    commits["a1"] = publish(hub, "acme/run-a", folders["a1"])
    hub.tag("acme/run-a", "step-1")
    commits["a2"] = hub.commit_folder("acme/run-a", folders["a2"])
    commits["b1"] = publish(hub, "acme/run-b1", folders["b1"])
    commits["b2"] = publish(hub, "acme/run-b2", folders["b2"])
    return commits


@pytest.mark.slow
def test_merge_from_repo_ids_equals_merge_from_folders(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path
) -> None:
    import warpmerge

    commits = publish_setup(hub, warp_setup)
    f = warp_setup
    local_cfg = write_config(tmp_path / "local.yaml", str(f["init"]), [str(f["a1"]), str(f["a2"])],
                             [str(f["b1"]), str(f["b2"])], tmp_path / "out-local")
    hub_cfg = write_config(tmp_path / "hub.yaml", "acme/init", ["acme/run-a@step-1", "acme/run-a"],
                           ["acme/run-b1", f"acme/run-b2@{commits['b2']}"], tmp_path / "out-hub")
    local_out = warpmerge.run(local_cfg).outputs[0]
    hub_out = warpmerge.run(hub_cfg).outputs[0]

    weights = tree_bytes(local_out, "model*")
    assert weights and tree_bytes(hub_out, "model*") == weights  # bit for bit

    prov = json.loads((hub_out / "warpmerge.json").read_text())
    by_ref = {i["ref"]: i for i in prov["inputs"]}
    assert by_ref["acme/init"]["commit"] == commits["init"]
    assert by_ref["acme/run-a@step-1"]["commit"] == commits["a1"]
    assert by_ref["acme/run-a@step-1"]["revision"] == "step-1"
    assert by_ref["acme/run-a"]["commit"] == commits["a2"]
    assert by_ref[f"acme/run-b2@{commits['b2']}"]["commit"] == commits["b2"]
    assert all(i["repo_id"] for i in prov["inputs"])
    for repo in ("acme/init", "acme/run-a", "acme/run-b1", "acme/run-b2"):
        assert not hub.requested_files(repo) & set(DECOYS)

    from huggingface_hub import ModelCard

    card = ModelCard((hub_out / "README.md").read_text())
    assert card.data.base_model[0] == "acme/init"
    assert set(card.data.base_model) == {"acme/init", "acme/run-a", "acme/run-b1", "acme/run-b2"}
    assert card.data.license == "gemma"  # from the init's card
    local_card = (local_out / "README.md").read_text()
    assert str(tmp_path) not in local_card


def test_cli_dry_run_with_hub_inputs_downloads_no_weights(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    publish_setup(hub, warp_setup)
    cfg = write_config(tmp_path / "hub.yaml", "acme/init", ["acme/run-a@step-1", "acme/run-a"],
                       ["acme/run-b1", "acme/run-b2"], tmp_path / "out")
    code, out, err = run_cli(["run", str(cfg), "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert "download" in out.lower()
    assert re.search(r"Download: [\d.]+ [KMG]?B into .* free\)", out), out
    for repo in ("acme/init", "acme/run-a", "acme/run-b1", "acme/run-b2"):
        fetched = hub.requested_files(repo, "GET")
        assert not any(n.endswith(".safetensors") and not _ranged(hub, repo, n) for n in fetched)
    assert not (tmp_path / "out").exists()


def _ranged(hub: FakeHub, repo: str, name: str) -> bool:
    """True if every GET of `name` was a range request (a header read, not a download)."""
    gets = [r for r in hub.file_requests(repo) if r.method == "GET" and r.path.endswith(name)]
    return all(r.range for r in gets)


def test_cli_offline_cold_cache_exit_code_3(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cfg = write_config(tmp_path / "hub.yaml", "acme/init", ["acme/run-a"], ["acme/run-b1"],
                       tmp_path / "out")
    set_offline(monkeypatch, True)
    code, out, err = run_cli(["run", str(cfg), "--quiet"], monkeypatch, capsys)
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_cli_push(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    folder = merged_folder(tmp_path / "out", 11, shards=2)
    code, out, err = run_cli(["push", str(folder), "alice/cli"], monkeypatch, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "HF_TOKEN" in err

    monkeypatch.setenv("HF_TOKEN", WRITE)
    code, out, err = run_cli(["push", str(folder), "alice/cli", "--private", "--revision", "dev",
                              "--message", "from the CLI"], monkeypatch, capsys)
    assert code == 0, err
    assert f"{hub.url}/alice/cli/tree/dev" in out
    assert hub.repos["alice/cli"].private
    assert hub.history("alice/cli", "dev")[0].message == "from the CLI"
    remote = hub.files("alice/cli", "dev")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == tree_bytes(folder)
    assert WRITE not in out + err


def test_run_pushes_when_configured(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE)
    f = warp_setup
    cfg = write_config(tmp_path / "push.yaml", str(f["init"]), [str(f["a1"]), str(f["a2"])],
                       [str(f["b1"]), str(f["b2"])], tmp_path / "out",
                       push={"repo_id": "alice/warp", "private": True})
    code, out, err = run_cli(["run", str(cfg), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert f"{hub.url}/alice/warp" in out + err
    remote = hub.files("alice/warp")
    local = tree_bytes(tmp_path / "out")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert hub.repos["alice/warp"].private
    for name, data in remote.items():  # no token, and no local path, in anything uploaded
        text = data.decode("latin-1")
        assert WRITE not in text, name
    assert str(tmp_path) not in remote["README.md"].decode()
    assert WRITE not in out + err


# --- the real Hub (opt-in) -------------------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("WARPMERGE_LIVE_HUB") != "1" or not os.environ.get("HF_TOKEN"),
    reason="set WARPMERGE_LIVE_HUB=1 and HF_TOKEN to run against the real Hub",
)
def test_live_hub_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Push a tiny model to a new private repo of the token's user, fetch it back, delete it."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    api = huggingface_hub.HfApi()
    user = api.whoami()["name"]
    repo_id = f"{user}/warpmerge-live-test-{uuid.uuid4().hex[:8]}"
    folder = merged_folder(tmp_path / "out", 12, shards=2)
    try:
        url = wh.push_folder(folder, repo_id, private=True, progress=False)
        assert url.endswith(repo_id)
        model = wh.fetch_model(repo_id, None, progress=False)
        for name in model.weight_files:
            assert (model.path / name).read_bytes() == (folder / name).read_bytes()
        headers = wh.remote_headers(repo_id, model.commit, model.weight_files)
        assert headers[model.weight_files[0]] == header_of(folder / model.weight_files[0])
    finally:
        api.delete_repo(repo_id, missing_ok=True)


@pytest.mark.slow
def test_cli_check_accepts_repo_ids(
    hub: FakeHub, warp_setup: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`warpmerge check` downloads a model named by repo id; a model against itself: KL 0."""
    publish_setup(hub, warp_setup)
    code, out, err = run_cli(["check", "acme/init", "--against", str(warp_setup["init"]),
                              "--against", "acme/run-a@step-1",
                              "--against", "hf://acme/run-a@step-1", "--json", "-q"],
                             monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(out)
    same, other, by_path = report["against"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    assert other["kl"] > 0
    assert by_path["kl"] == other["kl"]  # hf:// names the same model
    assert not hub.requested_files("acme/init") & set(DECOYS)


# --- checkpoints as trainers push them (hf:// folders, commit histories) ---------------------

TRAINER_FILES = {
    "optimizer.pt": b"\x80\x04decoy optimizer state" * 64,
    "scheduler.pt": b"\x80\x04decoy scheduler",
    "rng_state.pth": b"\x80\x04decoy rng",
    "rng_state_1.pth": b"\x80\x04decoy rng of rank 1",
    "training_args.bin": b"\x80\x04decoy args",
}
STEPS_B = (90, 200, 1000)  # all_checkpoints, uneven (a resumed run); "1000" < "90" as text
STEPS_C = (50, 150, 200)  # every_save


_OPENED: list[list[str]] = []  # the lists the audit hook appends to (hooks cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED[-1].append(os.fsdecode(args[0]))


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every file this process opens inside the block (through Python's `open` audit event)."""
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True  # type: ignore[attr-defined]
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def trainer_folder(folder: Path, tensors: dict, step: int | None) -> Path:
    """A checkpoint as transformers' Trainer saves it: weights, config, trainer state, and the
    trainer files a merge must never touch."""
    write_model(folder, tensors)
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                               "log_history": []}))
    for name, data in TRAINER_FILES.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def trl_runs(tmp_path: Path) -> dict[str, Path]:
    """An init and two runs as local folders: run b with trainer_state.json, run c without
    (TRL's every_save pushes none; its steps come from the commit titles)."""
    init = random_model(40)
    out = {"init": write_model(tmp_path / "local" / "init", init)}
    for run, steps, state in (("b", STEPS_B, True), ("c", STEPS_C, False)):
        cur = init
        for step in steps:
            cur = perturb(cur, 1000 * ord(run) + step, scale=0.02)
            out[f"{run}{step}"] = trainer_folder(
                tmp_path / "local" / run / f"checkpoint-{step}", cur, step if state else None)
    return out


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def publish_trl(hub: FakeHub, f: dict[str, Path]) -> dict[str, str]:
    """acme/init; acme/grpo-b as `all_checkpoints` leaves it (one commit per save adding
    checkpoint-N/ and the weights at the root); acme/grpo-c as `every_save` leaves it (one
    "Training in progress, step N" commit per save, weights at the root)."""
    commits = {"init": publish(hub, "acme/init", f["init"])}
    hub.create_repo("acme/grpo-b")
    for step in STEPS_B:
        root = {k: v for k, v in folder_files(f[f"b{step}"]).items() if k != "trainer_state.json"}
        commits[f"b{step}"] = hub.commit(
            "acme/grpo-b", {**root, **AUX, **folder_files(f[f"b{step}"], f"checkpoint-{step}/")},
            message=f"Training in progress, step {step}")
    logs = {"runs/events.out": b"tensorboard", "notes/checkpoint-1.txt": b"x",
            "last-checkpoint/optimizer.pt": b"\x80\x04decoy"}
    commits["b-main"] = hub.commit("acme/grpo-b", logs, message="logs")
    hub.create_repo("acme/grpo-c")
    for step in STEPS_C:
        files = {k: v for k, v in folder_files(f[f"c{step}"]).items()}
        commits[f"c{step}"] = hub.commit("acme/grpo-c", {**files, **AUX},
                                         message=f"Training in progress, step {step}")
        hub.commit("acme/grpo-c", {"README.md": b"# card"}, message="Upload model card")
    return commits


def trl_config(path: Path, init: str, b: object, c: object, out: Path, every: object = "auto",
               ) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "init": init,
        "policies": [{"name": "run-b", "checkpoints": b}, {"name": "run-c", "checkpoints": c}],
        "ema": {"mu": 0.01, "every": every},
        "liti": {"eta": 0.5},
        "output": {"path": str(out)},
    }))
    return path


HISTORY_C = {"hub_history": "acme/grpo-c", "match": "Training in progress*", "revision": "main"}


@pytest.mark.slow
def test_trl_hub_runs_merge_bit_identical_to_local_folders(
    hub: FakeHub, trl_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warpmerge

    f = trl_runs
    commits = publish_trl(hub, f)
    hub.page_size = 2  # the history and the tree listing come in several pages
    hub.tree_page_size = 5
    local_cfg = trl_config(tmp_path / "local.yaml", str(f["init"]),
                           str(tmp_path / "local" / "b" / "checkpoint-*"),
                           [str(f[f"c{s}"]) for s in STEPS_C], tmp_path / "out-local")
    hub_cfg = trl_config(tmp_path / "hub.yaml", "hf://acme/init@main",
                         "hf://acme/grpo-b@main/checkpoint-*", HISTORY_C, tmp_path / "out-hub")
    with opened_files() as opened:
        local_result = warpmerge.run(local_cfg)
        hub.clear_log()
        hub_out = warpmerge.run(hub_cfg).outputs[0]
    assert [p for p in opened if Path(p).name in TRAINER_FILES] == []  # never opened
    assert any(Path(p).name == "trainer_state.json" for p in opened)  # (the hook sees opens)

    weights = tree_bytes(local_result.outputs[0], "model*")
    assert weights and tree_bytes(hub_out, "model*") == weights  # bit for bit

    prov = json.loads((hub_out / "warpmerge.json").read_text())
    runs = [i for i in prov["inputs"] if i["role"] != "init"]
    expected = [("acme/grpo-b", commits["b-main"], f"checkpoint-{s}") for s in STEPS_B] + \
        [("acme/grpo-c", commits[f"c{s}"], "") for s in STEPS_C]
    assert [(i["repo_id"], i["commit"]) for i in runs] == [e[:2] for e in expected]
    assert [i["ref"] for i in runs] == [
        f"hf://{r}@{c}" + (f"/{p}" if p else "") for r, c, p in expected]

    # only the matched folders' weights, config and trainer state; never a trainer file
    allowed_b = {f"checkpoint-{s}/{n}" for s in STEPS_B
                 for n in ("model.safetensors", "config.json", "trainer_state.json")}
    assert hub.requested_files("acme/grpo-b") == allowed_b
    assert hub.requested_files("acme/grpo-c") == {"model.safetensors", "config.json"}
    everything = {r.path for r in hub.requests}
    assert not any(name in p for p in everything for name in TRAINER_FILES)
    assert not any(x in p for p in everything for x in ("runs/", "last-checkpoint",
                                                        "notes/"))

    # a warm cache reruns offline: listings and histories included
    set_offline(monkeypatch, True)
    hub.clear_log()
    again = warpmerge.run(trl_config(tmp_path / "hub2.yaml", "hf://acme/init@main",
                                     "hf://acme/grpo-b@main/checkpoint-*", HISTORY_C,
                                     tmp_path / "out-offline")).outputs[0]
    assert hub.requests == []
    assert tree_bytes(again, "model*") == weights


def test_cli_dry_run_shows_each_checkpoints_step_and_ema_weight(
    hub: FakeHub, trl_runs: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    publish_trl(hub, trl_runs)
    cfg = trl_config(tmp_path / "hub.yaml", "hf://acme/init", "hf://acme/grpo-b/checkpoint-*",
                     HISTORY_C, tmp_path / "out")
    hub.clear_log()
    code, out, err = run_cli(["run", str(cfg), "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    keep = 0.99  # 1 − μ; a_t = (1 − keep^(s_t − s_{t−1}))·keep^(s_T − s_t)
    for run, steps in (("run-b", STEPS_B), ("run-c", STEPS_C)):
        for t, step in enumerate(steps):
            gap = step - (steps[t - 1] if t else 0)
            weight = (1 - keep ** gap) * keep ** (steps[-1] - step)
            line = next(ln for ln in out.splitlines() if f"{run} checkpoint {t + 1} " in ln
                        and ": step" in ln)
            assert line.endswith(f": step {step}, EMA weight {weight:.6g}"), line
    assert "(checkpoint-200): step 200" in out and "(checkpoint-1000): step 1000" in out
    assert "(Training in progress, step 150 @ " in out
    for repo in ("acme/grpo-b", "acme/grpo-c"):  # headers by range, no weights, no trainer file
        assert all(r.range for r in hub.file_requests(repo)
                   if r.method == "GET" and r.path.endswith(".safetensors"))
        assert not any(n.rsplit("/", 1)[-1] in TRAINER_FILES for n in hub.requested_files(repo))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("b", "c", "code", "expected"), [
    ("hf://acme/grpo-b/checkpoint-*", dict(HISTORY_C, match="Epoch*"), 2,
     "no commit title matches 'Epoch*'"),
    ("hf://acme/nope/checkpoint-*", HISTORY_C, 3, "acme/nope: repository not found"),
    ("hf://acme/grpo-b/step-*", HISTORY_C, 2, "hf://acme/grpo-b/step-*: matches no folder"),
    ("hf://acme/grpo-b/checkpoint-7", HISTORY_C, 2, "is not a folder with files"),
    (["hf://acme/grpo-b/checkpoint-1000", "hf://acme/grpo-b/checkpoint-200"], HISTORY_C, 2,
     "run-b checkpoint 2 (checkpoint-200): step 200 does not follow step 1000"),
    ("hf://acme/grpo-b/checkpoint-*", dict(HISTORY_C, revision="nope"), 3,
     "revision 'nope' not found"),
    ("hf://acme/grpo-b@v9/checkpoint-*", HISTORY_C, 3, "revision 'v9' not found"),
    ("hf://acme/grpo-b@main/../x", HISTORY_C, 2, "not a Hub path"),
])
def test_cli_bad_hub_checkpoint_specs_are_one_line(
    hub: FakeHub, trl_runs: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys, b: object, c: object, code: int, expected: str
) -> None:
    publish_trl(hub, trl_runs)
    cfg = trl_config(tmp_path / "hub.yaml", str(trl_runs["init"]), b, c, tmp_path / "out")
    got, out, err = run_cli(["run", str(cfg), "--quiet"], monkeypatch, capsys)
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_cli_missing_step_and_cold_listing(
    hub: FakeHub, trl_runs: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import shutil

    publish_trl(hub, trl_runs)
    final = tmp_path / "local" / "final"  # no trainer_state.json, no number in its name
    shutil.copytree(trl_runs["c50"], final)
    cfg = trl_config(tmp_path / "a.yaml", str(trl_runs["init"]), [str(trl_runs["b90"]),
                     str(final)], HISTORY_C, tmp_path / "out")
    code, _, err = run_cli(["run", str(cfg), "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "run-b checkpoint 2 (final): no step for ema.every: auto" in err
    cfg = trl_config(tmp_path / "b.yaml", str(trl_runs["init"]), [str(trl_runs["b90"]),
                     str(final)], HISTORY_C, tmp_path / "out", every=10)
    code, out, err = run_cli(["run", str(cfg), "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 0, err  # a constant `every` needs no steps
    assert "(final): step 20, EMA weight" in out

    set_offline(monkeypatch, True)  # listed by the dry run, but no weights downloaded
    cfg = trl_config(tmp_path / "c.yaml", str(trl_runs["init"]), str(trl_runs["b90"]),
                     HISTORY_C, tmp_path / "out")
    code, _, err = run_cli(["run", str(cfg), "--quiet"], monkeypatch, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert f"acme/grpo-c@{hub.history('acme/grpo-c')[-2].sha} lacks files of the root" in err
    cfg = trl_config(tmp_path / "d.yaml", str(trl_runs["init"]), str(trl_runs["b90"]),
                     dict(HISTORY_C, hub_history="acme/grpo-b"), tmp_path / "out")
    code, _, err = run_cli(["run", str(cfg), "--quiet"], monkeypatch, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1  # never listed: nothing to rerun
    assert "acme/grpo-b@main was never listed online" in err and "HF_HUB_OFFLINE" in err


def test_an_adapter_folder_fetches_only_the_adapter_config_and_state(hub: FakeHub) -> None:
    """A PEFT checkpoint folder: adapter_config.json and adapter_model.safetensors (plus
    config.json and trainer_state.json for the step), nothing a trainer leaves beside them."""
    adapter = {"adapter_config.json": b'{"peft_type": "LORA", "r": 2}',
               "adapter_model.safetensors": b"\x08" + b"\0" * 7 + b"{}",
               "trainer_state.json": b'{"global_step": 30}', "README.md": b"# adapter",
               "tokenizer.json": b"{}", **TRAINER_FILES}
    hub.create_repo("acme/lora")
    hub.commit("acme/lora", {f"checkpoint-{s}/{n}": v for s in (10, 30) for n, v in
                             adapter.items()} | {"checkpoint-30/extra/x.safetensors": b"?",
                                                 "checkpoint-30/model.safetensors": b"?"})
    (first, second) = wh.resolve_hf_path("hf://acme/lora/checkpoint-*")
    assert (first.path, second.path) == ("checkpoint-10", "checkpoint-30")
    model = wh.fetch_checkpoint(second, progress=False)
    assert model.weight_files == ["adapter_model.safetensors"]
    assert set(model.files) == {"adapter_config.json", "adapter_model.safetensors",
                                "trainer_state.json"}
    assert hub.requested_files("acme/lora") == {f"checkpoint-30/{n}" for n in model.files}
    assert (model.path / "adapter_model.safetensors").read_bytes() == \
        adapter["adapter_model.safetensors"]
    assert model.path.name == "checkpoint-30" and model.commit == second.commit
    assert model.download_bytes == sum(len(adapter[n]) for n in model.files)
