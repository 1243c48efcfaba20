"""The command line: bad input is one line naming the culprit, exit 2, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, edit_model, edit_yaml, random_model, run_cli


def reshape(t):
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 32)


def drop(t):
    del t["model.layers.0.self_attn.k_proj.weight"]


def add_int(t):
    t["model.extra_ids"] = torch.arange(4)


def to_pickle(root: Path) -> None:
    folder = root / "run-b" / "step-2"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled")


def truncate(root: Path) -> None:
    f = root / "run-a" / "step-1" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def output_is_file(root: Path) -> None:
    (root / "out").write_text("I am a file")


def output_not_empty(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("precious")


def index_escapes(root: Path) -> None:
    folder = root / "run-a" / "step-2"
    shutil.move(folder / "model.safetensors", root / "elsewhere.safetensors")
    index = {"weight_map": {k: "../../elsewhere.safetensors" for k in random_model(0)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


CASES = {
    "unknown key": (edit_yaml("mu: 0.1", "mu_: 0.1"), "ema.mu_: unknown key (did you mean 'mu'?)"),
    "unknown top key": (edit_yaml("liti:", "lity:"), "lity: unknown key (did you mean 'liti'?)"),
    "wrong type": (edit_yaml("every: 2", "every: two"), "ema.every"),
    "mu range": (edit_yaml("mu: 0.1", "mu: 1.5"), "ema.mu"),
    "every range": (edit_yaml("every: 2", "every: 0"), "ema.every"),
    "eta nan": (edit_yaml("[0.3, 1.0]", "[0.3, .nan]"), "liti.eta"),
    "weight range": (edit_yaml("name: a\n", "name: a\n    weight: 0\n"), "policies[0].weight"),
    "lambda with 3 runs": (
        edit_yaml("ema:", "  - checkpoints: [run-a/step-1]\nslerp: {lambda: 0.5}\nema:"),
        "slerp.lambda needs exactly 2 runs"),
    "lambda range": (edit_yaml("ema:", "slerp: {lambda: 1.5}\nema:"), "slerp.lambda"),
    "dtype": (edit_yaml("shard_size: 20KB", "shard_size: 20KB, dtype: float8"), "output.dtype"),
    "shard size": (edit_yaml("20KB", "20XB"), "output.shard_size"),
    "duplicate runs": (edit_yaml("name: b", "name: a"), "duplicate run name 'a'"),
    "empty runs": (edit_yaml("[run-b/step-1, run-b/step-2]", "[]"), "policies[1].checkpoints"),
    "no policies": (edit_yaml("policies:\n", "policies: []\nx:\n"), "policies"),
    "yaml syntax": (edit_yaml("[0.3, 1.0]", "[0.3, 1.0"), "warp.yaml:8: YAML syntax error"),
    "missing init": (edit_yaml("init: init", "init: nowhere"), "init: folder not found: nowhere"),
    "glob matches nothing": (edit_yaml("run-a/step-*", "run-z/step-*"),
                             "a: checkpoint glob 'run-z/step-*' matches no folder"),
    "missing checkpoint": (edit_yaml("run-b/step-2]", "run-b/step-9]"),
                           "b checkpoint 2 (step-9): folder not found"),
    "shape mismatch": (edit_model("run-b/step-1", reshape),
                       "b checkpoint 1 (step-1): tensor model.layers.1.mlp.up_proj.weight has "
                       "shape [10, 32]"),
    "missing tensor": (edit_model("run-a/step-2", drop),
                       "a checkpoint 2 (step-2): missing tensor "
                       "model.layers.0.self_attn.k_proj.weight"),
    "extra tensor": (edit_model("run-a/step-1", add_int), "unexpected tensor model.extra_ids"),
    "pickle": (to_pickle, "only pickled weights (.bin)"),
    "truncated": (truncate, "a checkpoint 1 (step-1): model.safetensors: tensor"),
    "index escapes": (index_escapes, "names a file outside the model folder"),
    "output is a file": (output_is_file, "output path is an existing file"),
    "output not empty": (output_not_empty, "output folder is not empty"),
    "output inside input": (edit_yaml("path: out", "path: init/merged"), "overlaps the input init"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_the_culprit(setup, case, monkeypatch, capsys):
    change, expected = CASES[case]
    change(setup)
    before = sorted(p.relative_to(setup) for p in setup.rglob("*"))
    code, out, err = run_cli(["run", str(setup / "warp.yaml")], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, expected)
    after = sorted(p.relative_to(setup) for p in setup.rglob("*"))
    assert after == before  # nothing written, nothing half-written


def test_dry_run_prints_plan_and_writes_nothing(setup, monkeypatch, capsys):
    before = sorted(setup.rglob("*"))
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert sorted(setup.rglob("*")) == before
    assert "init:" in out and "a checkpoint 2 (step-2)" in out
    assert "Groups (layer): 4" in out and "model.layers.0" in out
    assert "eta=0.3" in out and "eta=1" in out and "shard(s)" in out
    assert "Dry run: nothing written." in out


def test_run_then_force(setup, monkeypatch, capsys):
    code, out, err = run_cli(["run", str(setup / "warp.yaml"), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert out.split() == [str(setup / "out" / "eta-0.3"), str(setup / "out" / "eta-1")]
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q"], monkeypatch, capsys)
    assert code == 2 and "--force" in err
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q", "--force", "--threads", "1",
                            "--out", str(setup / "other")], monkeypatch, capsys)
    assert code == 0, err
    assert (setup / "other" / "eta-1" / "model.safetensors.index.json").exists()


def test_version_and_usage_errors(monkeypatch, capsys):
    import warpmerge

    code, out, _ = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0 and out.strip() == f"warpmerge {warpmerge.__version__}"
    code, _, err = run_cli(["run"], monkeypatch, capsys)
    assert code == 2 and "CONFIG" in err
    code, _, err = run_cli(["run", "missing.yaml"], monkeypatch, capsys)
    assert code == 2 and "config file not found: missing.yaml" in err


@pytest.mark.slow
def test_demo_runs_offline(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["demo", "--out", str(tmp_path / "demo"), "-q"], monkeypatch, capsys)
    assert code == 0, err
    assert "Merged in" in out and "cos(Omega)" in out
    assert "run-lora of 3 PEFT LoRA adapter checkpoints (r=8, steps 125, 250, 300)" in out
    merged = tmp_path / "demo" / "merged" / "eta-0.3"
    assert (merged / "model.safetensors.index.json").exists()
    # the LoRA run is merged with its real steps: mu_eff = 1 - 0.99^gap, from the init at step 0
    runs = {r["name"]: r for r in json.loads((merged / "warpmerge.json").read_text())["runs"]}
    assert list(runs) == ["run-a", "run-b", "run-lora"]
    assert runs["run-lora"]["steps"] == [125, 250, 300]
    g = [1 - 0.99 ** gap for gap in (125, 125, 50)]
    expected = [g[0] * (1 - g[1]) * (1 - g[2]), g[1] * (1 - g[2]), g[2]]
    assert runs["run-lora"]["ema_coefficients"] == pytest.approx(expected, rel=1e-9)
    assert (tmp_path / "demo" / "emas" / "run-lora" / "model.safetensors.index.json").exists()
    front = json.loads((tmp_path / "demo" / "merged" / "front.json").read_text())
    assert [m["name"] for m in front["models"]][-3:] == ["run-a (EMA)", "run-b (EMA)",
                                                          "run-lora (EMA)"]


@pytest.mark.slow
def test_process_entry_point_matches_in_process(setup, monkeypatch, capsys):
    """`python -m warpmerge` ends without the interpreter's teardown (cli.entry): its exit
    codes, its lines and its files must be those of main() run in-process."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "warpmerge", *args], capture_output=True,
                              text=True, cwd=setup, timeout=300)

    done = cli("run", "warp.yaml", "-q", "--out", "sub")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(setup / "sub" / "eta-0.3"), str(setup / "sub" / "eta-1")]
    code, _, err = run_cli(["run", str(setup / "warp.yaml"), "-q", "--out", str(setup / "inp")],
                           monkeypatch, capsys)
    assert code == 0, err
    for eta in ("eta-0.3", "eta-1"):
        shards = sorted(p.name for p in (setup / "inp" / eta).glob("*.safetensors"))
        assert shards == sorted(p.name for p in (setup / "sub" / eta).glob("*.safetensors"))
        for name in shards:
            assert (setup / "sub" / eta / name).read_bytes() == \
                (setup / "inp" / eta / name).read_bytes()
    again = cli("run", "warp.yaml", "-q", "--out", "sub")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert cli("run").returncode == 2
    assert cli("--version").stdout.strip().startswith("warpmerge ")
