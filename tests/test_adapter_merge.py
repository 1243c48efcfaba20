"""Whole merges of PEFT adapter runs, against a float64 reference built from PEFT's own
merged tensors (`merge_and_unload()`, stored in the fixture) — never from our adapter code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_model, perturb, write_model
from reference import ref_ema, reference
from safetensors.torch import load_file

import warpmerge
from warpmerge.config import build_config

FIXTURES = Path(__file__).parent / "fixtures"
LORA = FIXTURES / "gemma2-tiny-lora"
STEPS = {"run-a": [100, 200, 300], "run-b": [150, 300], "run-c": [100, 250]}


@pytest.fixture(scope="module")
def peft_truth() -> dict[str, dict[str, torch.Tensor]]:
    """Every checkpoint's full model as PEFT merges it: the base, with PEFT's tensors over it."""
    base = load_file(str(FIXTURES / "gemma2-tiny" / "model.safetensors"))
    merged = load_file(str(LORA / "reference.safetensors"))
    truth = {}
    for run, steps in STEPS.items():
        for step in steps:
            key = f"{run}/checkpoint-{step}"
            model = dict(base)
            for name, t in merged.items():
                if name.startswith(key + "/"):
                    model[name.removeprefix(key + "/")] = t
            truth[key] = model
    return truth


def setup_runs(tmp_path: Path, runs: list[str]) -> Path:
    shutil.copytree(FIXTURES / "gemma2-tiny", tmp_path / "init")
    for run in runs:
        shutil.copytree(LORA / run, tmp_path / run)
    return tmp_path


def merge(tmp_path: Path, runs: list[str], **kw) -> warpmerge.api.RunResult:
    cfg = build_config(init="init", policies=[{"name": r, "checkpoints": f"{r}/checkpoint-*"}
                                              for r in runs],
                       output={"path": "out", "dtype": "float32"}, **kw)
    return warpmerge.run(cfg.with_base_dir(tmp_path))


def assert_close_to(out: Path, expected: dict[str, torch.Tensor]) -> float:
    """float32 outputs against the float64 reference: within float32 rounding."""
    got = load_model(out)
    worst = 0.0
    for name, ref in expected.items():
        err = (got[name].double() - ref).abs().max().item()
        scale = ref.abs().max().item() + 1e-30
        worst = max(worst, err / scale)
        torch.testing.assert_close(got[name].double(), ref, rtol=4e-6, atol=4e-7 * scale)
    return worst


@pytest.mark.parametrize("granularity", ["layer", "tensor", "model"])
def test_lora_rslora_and_dora_runs_merge_like_peft(tmp_path, peft_truth, granularity):
    """Three runs (LoRA; rsLoRA with patterns, embedding adapter and modules_to_save; DoRA),
    every: auto over their real, uneven steps, two η."""
    runs = ["run-a", "run-b", "run-c"]
    setup_runs(tmp_path, runs)
    result = merge(tmp_path, runs, ema={"mu": 0.004, "every": "auto"},
                   slerp={"granularity": granularity}, liti={"eta": [0.5, 1.5]})
    init = {k: v.double() for k, v in
            load_file(str(tmp_path / "init" / "model.safetensors")).items()}
    ckpts = [[peft_truth[f"{r}/checkpoint-{s}"] for s in STEPS[r]] for r in runs]
    expected = reference(init, ckpts, mu=0.004, granularity=granularity, etas=(0.5, 1.5),
                         steps=[STEPS[r] for r in runs])
    for out, ref in zip(result.outputs, expected, strict=True):
        assert_close_to(out, ref)
    angles = json.loads((result.outputs[0] / "warpmerge.json").read_text())["groups"]
    assert any(step["mode"] == "slerp" for g in angles for step in g["chain"])


def test_adapter_and_full_checkpoints_mix_in_one_run(tmp_path, peft_truth):
    """run-a's middle checkpoint given as a full model (PEFT's merged weights), the rest as
    adapters, with a second run of full checkpoints: the same merge as all-full."""
    setup_runs(tmp_path, ["run-a"])
    full = peft_truth["run-a/checkpoint-200"]
    shutil.rmtree(tmp_path / "run-a" / "checkpoint-200")
    write_model(tmp_path / "run-a" / "checkpoint-200", full)
    cfg_json = json.loads((FIXTURES / "gemma2-tiny" / "config.json").read_text())
    (tmp_path / "run-a" / "checkpoint-200" / "config.json").write_text(json.dumps(cfg_json))
    base = load_file(str(tmp_path / "init" / "model.safetensors"))
    other = [perturb(base, 5, 0.02), None]
    other[1] = perturb(other[0], 6, 0.02)
    for i, m in enumerate(other):
        write_model(tmp_path / "run-z" / f"step-{i + 1}", m)
    cfg = build_config(init="init", policies=[{"name": "a", "checkpoints": "run-a/checkpoint-*"},
                                              {"name": "z", "checkpoints": "run-z/step-*"}],
                       ema={"mu": 0.3}, output={"path": "out", "dtype": "float32"})
    result = warpmerge.run(cfg.with_base_dir(tmp_path))
    init = {k: v.double() for k, v in base.items()}
    ckpts = [[peft_truth[f"run-a/checkpoint-{s}"] for s in STEPS["run-a"]], other]
    (expected,) = reference(init, ckpts, mu=0.3)
    assert_close_to(result.outputs[0], expected)


@pytest.mark.slow
def test_adapter_merges_are_bit_identical_across_threads_and_chunks(tmp_path):
    runs = ["run-b", "run-c"]  # embedding adapter, modules_to_save, DoRA
    setup_runs(tmp_path, runs)
    outs = []
    for i, (threads, chunk, budget) in enumerate([(1, None, None), (2, 1 << 16, None),
                                                  (2, 3 << 16, 1)]):
        cfg = build_config(init="init", policies=[{"checkpoints": f"{r}/checkpoint-*"}
                                                  for r in runs],
                           output={"path": f"out{i}"})
        result = warpmerge.run(cfg.with_base_dir(tmp_path), threads=threads, chunk=chunk,
                               max_memory=budget)
        outs.append((result.outputs[0] / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_dry_run_names_adapters_steps_and_weights(tmp_path):
    setup_runs(tmp_path, ["run-c"])
    cfg = build_config(init="init", policies=[{"checkpoints": "run-c/checkpoint-*"}],
                       ema={"mu": 0.01, "every": "auto"}, output={"path": "out"})
    plan = warpmerge.plan(cfg.with_base_dir(tmp_path))
    text = str(plan)
    assert "run-1 checkpoint 1 (checkpoint-100): step 100, EMA weight" in text
    assert "run-1 checkpoint 2 (checkpoint-250): step 250, EMA weight" in text
    # the adapter was trained on another path than this init: said, not refused
    assert any("shared/fixtures/gemma2-tiny" in w for w in plan.warnings)
    # an adapter reads nothing of the model's size: only the init is read
    init_bytes = (tmp_path / "init" / "model.safetensors").stat().st_size
    assert plan.read_bytes() < init_bytes


def test_an_adapter_as_init_is_refused(tmp_path):
    setup_runs(tmp_path, ["run-a"])
    cfg = build_config(init="run-a/checkpoint-100", policies=[{"checkpoints": "run-a/*"}],
                       output={"path": "out"})
    with pytest.raises(warpmerge.errors.InputError, match="init.*PEFT adapter"):
        warpmerge.plan(cfg.with_base_dir(tmp_path))


@pytest.mark.parametrize("save", [None, "emas"])
def test_check_section_with_adapter_runs(tmp_path, save):
    """The check compares each output with the init and each run: its saved EMA, else its
    last checkpoint, unless that is an adapter (no model to load), which is left out."""
    runs = ["run-a", "run-c"]
    setup_runs(tmp_path, runs)
    ema = {"mu": 0.01, **({"save": save} if save else {})}
    result = merge(tmp_path, runs, ema=ema, check={"max_new_tokens": 2})
    check = json.loads((result.outputs[0] / "warpmerge.json").read_text())["check"]
    against = [a["path"] for a in check["against"]]
    assert against == (["init", "run-a", "run-c"] if save else ["init"])
    assert all(a["kl"] is not None and a["kl"] >= 0 for a in check["against"])


def test_use_last_merges_last_adapters_and_saves_their_emas(tmp_path, peft_truth):
    """use: last with ema.save: the merge takes each run's last checkpoint, the saved EMA
    averages all of them (the fused low-rank products differ between the two)."""
    runs = ["run-a", "run-b"]
    setup_runs(tmp_path, runs)
    result = merge(tmp_path, runs, ema={"mu": 0.004, "every": "auto", "use": "last",
                                        "save": "emas"})
    init = {k: v.double() for k, v in
            load_file(str(tmp_path / "init" / "model.safetensors")).items()}
    ckpts = [[peft_truth[f"{r}/checkpoint-{s}"] for s in STEPS[r]] for r in runs]
    (expected,) = reference(init, ckpts, mu=0.004, use="last", steps=[STEPS[r] for r in runs])
    assert_close_to(result.outputs[0], expected)
    for run, ema_dir, run_ckpts in zip(runs, result.ema_outputs, ckpts, strict=True):
        ema = {k: ref_ema(v, [c[k].double() for c in run_ckpts], 0.004, STEPS[run], "init",
                          "ema") for k, v in init.items()}
        assert_close_to(ema_dir, ema)


def test_adapter_factors_count_against_the_memory_budget(tmp_path):
    """The factors held in memory (twice: as read and fused) leave that much less room for
    the cache: a budget that would keep the largest group whole without them keeps it only in
    part, or not at all."""
    from safetensors import safe_open

    runs = ["run-a", "run-b"]
    setup_runs(tmp_path, runs)
    cfg = build_config(init="init", policies=[{"checkpoints": f"{r}/checkpoint-*"}
                                              for r in runs],
                       slerp={"granularity": "tensor"}, output={"path": "out"}).with_base_dir(
                           tmp_path)
    roomy = warpmerge.plan(cfg, threads=1)
    factors = 0  # the float tensors of every adapter file, read with safetensors
    for f in tmp_path.glob("run-*/checkpoint-*/adapter_model.safetensors"):
        with safe_open(str(f), "pt") as h:
            factors += sum(h.get_tensor(k).float().nbytes for k in h.keys()
                           if "lora_" in k or "magnitude" in k)
    assert roomy.adapter_bytes() == 2 * factors
    biggest = max(roomy.groups, key=lambda g: g.cache_numel)
    need = roomy.workspace_bytes() + 3 * 4 * biggest.cache_numel
    assert warpmerge.plan(cfg, threads=1, max_memory=need + roomy.adapter_bytes()).cacheable(
        biggest)
    half = 3 * 4 * (biggest.cache_numel // 2)
    tight = warpmerge.plan(cfg, threads=1, max_memory=need + roomy.adapter_bytes() - half)
    assert 0 < tight.cached_numel(biggest) < biggest.cache_numel
    assert not warpmerge.plan(cfg, threads=1, max_memory=need).cacheable(biggest)
