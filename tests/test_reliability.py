"""Reliability: the rest of the bad-input catalogue, killed and interrupted merges, full disks,
and bit-identical output whatever the thread count, chunk size or memory budget.

The catalogue here extends tests/test_cli.py (which it does not repeat): every entry is one line
on stderr naming the culprit, the contract's exit code, no traceback, and nothing left behind.
The kill tests run real `python -m warpmerge` processes on a model big enough to be caught
mid-write, and check that whatever a kill leaves is either nothing, a staging folder the next run
clears, or a complete model identical to an uninterrupted run's.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    OLD_NS,
    act_when,
    assert_one_line_error,
    assert_same_model,
    edit_model,
    edit_yaml,
    journaled_shards,
    load_model,
    n_shards,
    random_model,
    rerun,
    run_cli,
    shard_written,
    sigkill,
    staging_of,
    stamp_old,
    start_merge,
    wait_for,
    write_model,
)

PARTIAL = ".*warpmerge-partial"



# --- the catalogue ---------------------------------------------------------------------------



def tree(root: Path) -> list[tuple[str, int]]:
    """Every path under root with its size: what 'nothing written' is checked against."""
    return sorted((p.relative_to(root).as_posix(), p.lstat().st_size if p.is_file() else -1)
                  for p in root.rglob("*"))


def leftovers(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob(PARTIAL)] + [
        p.relative_to(root).as_posix() for p in root.rglob("*.warpmerge-old")]


def all_models(change):
    """Apply `change(tensors, folder)` to the init and every checkpoint."""
    def apply(root: Path) -> None:
        for folder in ("init", "run-a/step-1", "run-a/step-2", "run-b/step-1", "run-b/step-2"):
            edit_model(folder, lambda t, f=folder: change(t, f))(root)
    return apply


def set_value(name: str, index: tuple[int, ...], value: float):
    def change(t):
        t[name][index] = value
    return change


def int_tensor_differs(t, folder):
    t["model.extra_ids"] = torch.arange(4) + (1 if folder == "run-b/step-1" else 0)


def move_out(root: Path, folder: str) -> Path:
    """Move a checkpoint's weights out of its folder (to root/elsewhere/)."""
    (root / "elsewhere").mkdir(exist_ok=True)
    target = root / "elsewhere" / folder.replace("/", "-")
    shutil.move(root / folder / "model.safetensors", target)
    return target


def index_absolute(root: Path) -> None:
    target = move_out(root, "run-a/step-2")
    index = {"weight_map": {k: str(target) for k in random_model(0)}}
    (root / "run-a/step-2/model.safetensors.index.json").write_text(json.dumps(index))


def shard_symlink_outside(root: Path) -> None:
    target = move_out(root, "run-a/step-1")
    (root / "run-a/step-1/model.safetensors").symlink_to(target)


def index_symlink_outside(root: Path) -> None:
    target = move_out(root, "run-b/step-1")
    index = {"weight_map": {k: "model.safetensors" for k in random_model(0)}}
    (root / "elsewhere" / "index.json").write_text(json.dumps(index))
    (root / "run-b/step-1/model.safetensors").symlink_to(target)
    (root / "run-b/step-1/model.safetensors.index.json").symlink_to(root / "elsewhere/index.json")


def index_missing_shard(root: Path) -> None:
    names = list(random_model(0))
    folder = root / "run-b" / "step-2"
    shutil.move(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def garbage_header(root: Path) -> None:
    path = root / "run-a" / "step-2" / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{not json: " + b"!" * (n - 11)
    path.write_bytes(bytes(data))


def header_too_long(root: Path) -> None:
    path = root / "run-b" / "step-1" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1)
    path.write_bytes(bytes(data))


def too_short(root: Path) -> None:
    (root / "run-a" / "step-1" / "model.safetensors").write_bytes(b"\x05\x00")


def input_inside_output(root: Path) -> list[str]:
    return ["--force", "--out", str(root / "run-a")]


def output_through_symlink_into_input(root: Path) -> list[str]:
    (root / "link").symlink_to(root / "init")
    return ["--out", str(root / "link" / "merged")]


CATALOGUE = {
    # (change, expected substrings of the one-line error, exit code)
    "non-float tensor differs": (
        all_models(int_tensor_differs), ("b checkpoint 1 (step-1)", "model.extra_ids"), 2),
    "index with an absolute path": (
        index_absolute, ("a checkpoint 2 (step-2)", "outside the model folder"), 2),
    "shard symlink leading outside": (
        shard_symlink_outside,
        ("a checkpoint 1 (step-1): model.safetensors is a symlink leading outside", ), 2),
    "index symlink leading outside": (
        index_symlink_outside, ("b checkpoint 1 (step-1)", "model.safetensors.index.json",
                                "outside the model folder"), 2),
    "index names a missing shard": (
        index_missing_shard, ("b checkpoint 2 (step-2)",
                              "names a missing shard model-00002-of-00002.safetensors"), 2),
    "garbage header JSON": (
        garbage_header, ("a checkpoint 2 (step-2): model.safetensors has a corrupt safetensors "
                         "header",), 2),
    "header length beyond the file": (
        header_too_long, ("b checkpoint 1 (step-1): model.safetensors has a corrupt", ), 2),
    "file shorter than a header": (
        too_short, ("a checkpoint 1 (step-1): model.safetensors is not a safetensors file",), 2),
    "NaN in a checkpoint": (
        edit_model("run-a/step-2", set_value("model.layers.1.mlp.up_proj.weight", (3, 4),
                                             float("nan"))),
        ("a checkpoint 2 (step-2): tensor model.layers.1.mlp.up_proj.weight",
         "NaN or Inf", "--allow-nonfinite"), 2),
    "Inf in the init": (
        edit_model("init", set_value("model.norm.weight", (5,), float("inf"))),
        ("init: tensor model.norm.weight", "NaN or Inf"), 2),
    "-Inf in a checkpoint of a one-checkpoint run": (
        lambda root: (edit_yaml("[run-b/step-1, run-b/step-2]", "[run-b/step-1]")(root),
                      edit_model("run-b/step-1", set_value("model.embed_tokens.weight", (0, 0),
                                                           float("-inf")))(root)),
        ("b checkpoint 1 (step-1): tensor model.embed_tokens.weight", "NaN or Inf"), 2),
    "eta not a number": (edit_yaml("[0.3, 1.0]", "abc"), ("warp.yaml:8:", "liti.eta")),
    "eta list holds a string": (edit_yaml("[0.3, 1.0]", "[0.3, x]"),
                                ("warp.yaml:8:", "liti.eta[1]")),
    "weight not a number": (edit_yaml("name: a\n", "name: a\n    weight: heavy\n"),
                            ("warp.yaml:4:", "policies[0].weight")),
    "weight negative": (edit_yaml("name: a\n", "name: a\n    weight: -1\n"),
                        ("policies[0].weight", "greater than 0")),
    "every not an integer": (edit_yaml("every: 2", "every: 1.5"), ("warp.yaml:7:", "ema.every")),
    "every a string": (edit_yaml("every: 2", "every: '2'"), ("ema.every",)),
    "mu zero": (edit_yaml("mu: 0.1", "mu: 0"), ("warp.yaml:7:", "ema.mu", "greater than 0")),
    "mu a string": (edit_yaml("mu: 0.1", "mu: fast"), ("ema.mu",)),
    "shard size zero": (edit_yaml("20KB", "0MB"), ("output.shard_size", "greater than 0")),
    "shard size boolean": (edit_yaml("20KB", "true"), ("output.shard_size",)),
    "dtype not a float type": (edit_yaml("shard_size: 20KB", "shard_size: 20KB, dtype: int8"),
                               ("output.dtype",)),
    "ema.save inside output.path": (edit_yaml("every: 2", "every: 2, save: out/emas"),
                                    ("ema.save (", "overlaps output.path")),
    "ema.save inside an input": (edit_yaml("every: 2", "every: 2, save: init/emas"),
                                 ("overlaps the input init",)),
    "input inside the output (with --force)": (input_inside_output,
                                               ("overlaps the input a checkpoint 1",), 2),
    "output through a symlink into an input": (output_through_symlink_into_input,
                                               ("overlaps the input init",), 2),
    "max-memory not a size": (lambda root: ["--max-memory", "lots"], ("--max-memory",), 2),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue(setup, case, monkeypatch, capsys):
    change, expected, *code = CATALOGUE[case]
    args = change(setup)
    args = args if isinstance(args, list) else []
    before = tree(setup)
    status, out, err = run_cli(["run", str(setup / "warp.yaml"), "-q", *args], monkeypatch, capsys)
    assert status == (code[0] if code else 2), err
    assert_one_line_error(err, *expected)
    assert out == ""
    assert not (setup / "out").exists()
    assert leftovers(setup) == []
    assert tree(setup) == before  # nothing written, nothing half-written, no input touched


def test_allow_nonfinite_lets_nan_through(setup, monkeypatch, capsys):
    name = "model.layers.1.mlp.up_proj.weight"
    edit_model("run-a/step-2", set_value(name, (3, 4), float("nan")))(setup)
    edit_model("init", set_value("model.norm.weight", (5,), float("inf")))(setup)
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "-q", "--allow-nonfinite"],
                             monkeypatch, capsys)
    assert code == 0, err
    assert leftovers(setup) == []
    got = load_model(setup / "out" / "eta-1")
    assert not torch.isfinite(got[name]).all()
    assert not torch.isfinite(got["model.norm.weight"]).all()


def test_nan_caught_by_dry_run_or_run_leaves_nothing(setup, monkeypatch, capsys):
    """NaN needs the data, which a dry run never reads: the real run catches it, writes nothing."""
    edit_model("run-b/step-2", set_value("model.norm.weight", (1,), float("nan")))(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    before = tree(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q", "--threads", "2"],
                           monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "b checkpoint 2 (step-2): tensor model.norm.weight",
                          "NaN or Inf")
    assert tree(setup) == before


class _Recorder:
    """Wraps builtins.open, io.open and os.open; records every path opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def rec_open(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike):
                self.paths.append(os.path.realpath(os.fsdecode(file)))
            return real_open(file, *args, **kwargs)

        def rec_os_open(path, *args, **kwargs):
            self.paths.append(os.path.realpath(os.fsdecode(path)))
            return real_os_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", rec_open)
        monkeypatch.setattr(io, "open", rec_open)
        monkeypatch.setattr(os, "open", rec_os_open)


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("warpmerge tried to unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


class _Booby:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant_pickles(folder: Path, marker: Path) -> dict[Path, bytes]:
    payload = pickle.dumps(_Booby(marker))
    files = {
        folder / "pytorch_model.bin": payload,
        folder / "training_args.bin": payload,
        folder / "optimizer.pt": payload,
        folder / "rng_state.pth": payload,
    }
    for path, data in files.items():
        path.write_bytes(data)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("# a checkpoint\n")
    return files


def test_pickle_only_checkpoint_is_refused_never_opened(setup, monkeypatch, capsys):
    folder = setup / "run-b" / "step-2"
    (folder / "model.safetensors").unlink()
    marker = setup.parent / f"{setup.name}-unpickled"
    pickles = _plant_pickles(folder, marker)
    rec = _Recorder(monkeypatch)
    _forbid_unpickling(monkeypatch)
    before = tree(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "b checkpoint 2 (step-2): only pickled weights (.bin)",
                          "never loads pickles")
    assert not marker.exists()
    opened = [p for p in rec.paths if Path(p) in {q.resolve() for q in pickles}]
    assert opened == []
    assert all(path.read_bytes() == data for path, data in pickles.items())
    assert tree(setup) == before


def test_pickles_beside_safetensors_are_never_opened(setup, monkeypatch, capsys):
    marker = setup.parent / f"{setup.name}-unpickled"
    pickles = _plant_pickles(setup / "run-a" / "step-1", marker)
    rec = _Recorder(monkeypatch)
    _forbid_unpickling(monkeypatch)
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert not marker.exists()
    assert not {Path(p) for p in rec.paths} & {q.resolve() for q in pickles}


def test_symlinks_inside_the_model_folder_are_fine(setup, monkeypatch, capsys):
    folder = setup / "run-a" / "step-1"
    (folder / "model.safetensors").rename(folder / "weights.bin.safetensors-real")
    (folder / "model.safetensors").symlink_to("weights.bin.safetensors-real")
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_init_metadata_symlink_leading_outside_is_refused(setup, name, monkeypatch, capsys):
    secret = setup.parent / f"{setup.name}-secret.json"
    secret.write_text('{"secret": "do not copy me"}')
    init = setup / "init"
    if (init / name).exists():
        (init / name).unlink()
    (init / name).symlink_to(secret)
    before = tree(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "init", name, "outside the model folder")
    assert tree(setup) == before


def test_invalid_init_config_json_leaves_nothing(setup, monkeypatch, capsys):
    (setup / "init" / "config.json").write_text("{not json")
    before = tree(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "init: config.json is not valid JSON")
    assert tree(setup) == before


def test_invalid_init_config_json_caught_by_dry_run(setup, monkeypatch, capsys):
    (setup / "init" / "config.json").write_text("{not json")
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "init: config.json is not valid JSON")


def test_index_that_is_a_folder(setup, monkeypatch, capsys):
    (setup / "run-a" / "step-1" / "model.safetensors.index.json").mkdir()
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "a checkpoint 1 (step-1)", "model.safetensors.index.json")


# --- config files the YAML layer chokes on -----------------------------------------------------

def test_duplicate_yaml_key(setup, monkeypatch, capsys):
    edit_yaml("ema: {mu: 0.1, every: 2}", "ema: {mu: 0.1, every: 2, mu: 0.5}")(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "warp.yaml:7", "mu")


def test_control_character_in_yaml(setup, monkeypatch, capsys):
    edit_yaml("init: init", "init: in\x07it")(setup)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "warp.yaml", "character")


def test_config_not_utf8(setup, monkeypatch, capsys):
    (setup / "warp.yaml").write_bytes(b"init: \xff\xfe\n")
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "warp.yaml")


@pytest.mark.parametrize("where", ["shard_size", "--max-memory"])
def test_absurd_size(setup, where, monkeypatch, capsys):
    huge = "9" * 400 + "GB"
    args = []
    if where == "shard_size":
        edit_yaml("20KB", huge)(setup)
    else:
        args = ["--max-memory", huge]
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run", *args],
                           monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, where)


def test_deeply_nested_yaml(setup, monkeypatch, capsys):
    (setup / "warp.yaml").write_text("init: " + "[" * 1000 + "]" * 1000 + "\n")
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "warp.yaml")


# --- killed and interrupted merges ------------------------------------------------------------

def staging_files(out: Path) -> list[Path]:
    return sorted(p for p in staging_of(out).rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["at start", "mid-way", "near the end", "mid-way, --force"])
def test_sigkill_leaves_nothing_or_staging_then_rerun_is_identical(
        big, big_reference, tmp_path, moment, monkeypatch, capsys):
    """Killed at a point of observable progress, a merge leaves its final folder absent (or,
    with --force, the old complete model) and at most a staging folder, which a rerun without
    --resume clears and rewrites in full. (Kill then --resume: tests/test_resume.py.)"""
    out = tmp_path / "out"
    total = n_shards(big_reference)
    args = ["--threads", "2"]
    if moment == "mid-way, --force":  # an existing complete model must survive the kill
        shutil.copytree(big_reference, out)
        args.append("--force")
    proc = start_merge(big, out, *args)
    if moment == "at start":  # past the imports and the checks, inside the merge
        reached = wait_for(proc, staging_of(out).exists)
    elif moment.startswith("mid-way"):
        reached = wait_for(proc, lambda: len(journaled_shards(out)) >= 3)
    else:
        reached = wait_for(proc, lambda: shard_written(out, total, total)()
                           or (staging_of(out) / "warpmerge.json").exists() or out.exists())
    sigkill(proc)
    assert reached
    # the invariant: the final folder is absent or complete; anything else is the staging folder
    leftover = sorted(p.name for p in tmp_path.iterdir())
    assert set(leftover) <= {"out", staging_of(out).name}, leftover
    if moment in ("at start", "mid-way"):
        assert leftover == [staging_of(out).name]
    if moment == "mid-way, --force":
        assert leftover == [staging_of(out).name, "out"]
    if out.exists():
        assert_same_model(out, big_reference)
    if moment == "mid-way":
        assert 3 <= len(journaled_shards(out)) < total
        # what a killed run with another layout would leave; and stamps that a rerun which
        # kept the shards instead of rewriting them would not change
        (staging_of(out) / "model-00099-of-00099.safetensors").write_bytes(b"stale")
        for path in staging_files(out):
            stamp_old(path)
    rerun(big, out, monkeypatch, capsys, *(["--force"] if out.exists() else []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert_same_model(out, big_reference)
    assert all(p.stat().st_mtime_ns != OLD_NS for p in out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sig,threads", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_interrupt_stops_cleanly(big, big_reference, tmp_path, sig, threads):
    out = tmp_path / "out"
    proc = start_merge(big, out, "--threads", threads)
    stdout, err = act_when(proc, shard_written(out, 3, n_shards(big_reference)),
                           lambda: proc.send_signal(sig))
    assert proc.returncode == 1, err
    assert_one_line_error(err, "interrupted")
    assert stdout == b""
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder


def test_interrupt_while_planning_exits_1_with_a_message(setup, monkeypatch, capsys):
    import warpmerge.resolve

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, while the inputs are opened
        time.sleep(5)  # the CLI's handler raises here

    monkeypatch.setattr(warpmerge.resolve, "open_checkpoint", interrupted)
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "interrupted")
    assert leftovers(setup) == [] and not (setup / "out").exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error_leaving_nothing(big, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: a write fails half-way through shard 1."""
    out = tmp_path / "out"
    proc = start_merge(big, out, preexec_fn=_limit_file_size(2 * 10**6))
    stdout, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 1, err
    assert_one_line_error(err, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_clear_error_leaving_nothing(setup, monkeypatch, capsys):
    """ENOSPC on the 3rd write to a shard, injected into every binary file opened for writing."""
    real_open = builtins.open

    class Full(io.RawIOBase):
        def __init__(self, f) -> None:
            self.f, self.n = f, 0

        def write(self, data) -> int:
            self.n += 1
            if self.n >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def fileno(self) -> int:
            return self.f.fileno()

        def flush(self) -> None:
            if not self.f.closed:
                self.f.flush()

        def close(self) -> None:
            self.f.close()
            super().close()

        def writable(self) -> bool:
            return True

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, int) and "warpmerge-partial" in os.fsdecode(file) \
                and mode == "wb":  # the shards (an int is a pipe, e.g. to the plot painter)
            return Full(f)
        return f

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    before = tree(setup)
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 1, err
    assert_one_line_error(err, "disk full", str(setup / "out"))
    assert tree(setup) == before


def test_free_space_checked_before_writing(setup, monkeypatch, capsys):
    def usage(path):
        return shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    before = tree(setup)
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 1, err
    assert_one_line_error(err, "not enough free space", "missing", "1.0 KB is free")
    assert tree(setup) == before


def test_free_space_checked_on_the_disk_of_ema_save(setup, monkeypatch, capsys):
    """ema.save on another disk (here /dev, another filesystem, said to be nearly full): that
    disk is checked for the saved EMAs, the output's disk for the merged models."""
    import warpmerge.probes

    real = warpmerge.probes.free_bytes

    def free_bytes(path):
        return (Path("/dev"), 1000) if "emas" in str(path) else real(path)

    monkeypatch.setattr(warpmerge.probes, "free_bytes", free_bytes)
    text = (setup / "warp.yaml").read_text()
    (setup / "warp.yaml").write_text(text.replace("ema: {mu: 0.1, every: 2}",
                                                  "ema: {mu: 0.1, every: 2, save: emas}"))
    code, out, _ = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0
    disks = [line for line in out.splitlines() if line.startswith("Disk at")]
    assert len(disks) == 2 and disks[1].startswith("Disk at /dev: 1.0 KB free for ")
    assert "MISSING" in disks[1] and "MISSING" not in disks[0]
    before = tree(setup)
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 1, err
    assert_one_line_error(err, "not enough free space at /dev", "1.0 KB is free")
    assert tree(setup) == before


# --- determinism ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_bit_identical_across_threads_chunks_and_memory(tmp_path, monkeypatch, capsys):
    """Through the CLI, bfloat16 output, saved EMAs, two etas, tensors of 262,144 and 300,000
    elements (neither a multiple of every chunk size), cached and uncached passes."""
    g = torch.Generator().manual_seed(1)
    init = {"model.layers.0.mlp.up_proj.weight": torch.randn(512, 512, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(600, 500, generator=g),
            "model.layers.1.self_attn.q_proj.weight": torch.randn(300, 1000, generator=g),
            "model.norm.weight": torch.randn(512, generator=g),
            "model.ids": torch.arange(7)}
    write_model(tmp_path / "init", init)
    for r in range(2):
        cur = init
        for t in range(3):
            cur = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                   else v for k, v in cur.items()}
            write_model(tmp_path / f"run{r}" / f"step-{t + 1}", cur)
    (tmp_path / "warp.yaml").write_text(
        "init: init\npolicies:\n  - {checkpoints: run0/step-*, weight: 2}\n"
        "  - {checkpoints: run1/step-*}\nema: {mu: 0.3, save: emas}\nliti: {eta: [0.4, 1.1]}\n"
        "output: {path: out, dtype: bfloat16, shard_size: 1MB}\n")
    variants = [[], ["--threads", "1", "--chunk-size", "65536"],
                ["--threads", "2", "--chunk-size", "65536", "--max-memory", "1MB"],
                ["--threads", "2", "--chunk-size", "196608"]]
    digests = []
    for i, args in enumerate(variants):
        code, _, err = run_cli(["run", str(tmp_path / "warp.yaml"), "-q", "--force",
                                "--out", str(tmp_path / f"out{i}"), *args], monkeypatch, capsys)
        assert code == 0, err
        shutil.move(tmp_path / "emas", tmp_path / f"out{i}" / "emas")
        out = tmp_path / f"out{i}"
        files = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*")
                       if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
        assert len([f for f, _ in files if f.endswith(".safetensors")]) > 6
        digests.append(files)
    assert all(d == digests[0] for d in digests[1:])
