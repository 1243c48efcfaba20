"""The planner as a pure function, and `warpmerge.plan` as the dry run's Python form."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

import warpmerge
from warpmerge.config import load_config
from warpmerge.errors import InputError
from warpmerge.planner import DiskNeed, plan_merge
from warpmerge.probes import FreeSpace, Machine
from warpmerge.resolve import resolve_inputs


def machine_for(paths: dict[Path, tuple[int, int]], memory: int = 8 * 2**30) -> Machine:
    """A made-up machine: path -> (disk id, free bytes)."""
    return Machine(cpus=3, available_memory=memory,
                   space=tuple(FreeSpace(p, p, dev, free) for p, (dev, free) in paths.items()))


def test_plan_is_decided_from_data_alone(setup: Path) -> None:
    """Same inputs, another machine: the plan follows the snapshot, not this computer."""
    cfg = load_config(setup / "warp.yaml")
    inputs = resolve_inputs(cfg)
    root = cfg.output_root()
    small = plan_merge(cfg, inputs, machine_for({root: (7, 10)}, memory=2**30))
    assert small.threads == 3
    assert small.max_memory == 256 * 2**20  # a quarter of 1 GiB, at the 256 MiB floor
    assert small.disk_needs() == [DiskNeed(root, 10, 2 * small.model_bytes)]
    assert small.disk_needs()[0].missing == 2 * small.model_bytes - 10
    big = plan_merge(cfg, inputs, machine_for({root: (7, 10**12)}, memory=64 * 2**30),
                     threads=5)
    assert big.threads == 5 and big.max_memory == 2 * 2**30  # capped at 2 GiB
    assert big.disk_needs()[0].missing == 0
    assert big.layout == small.layout  # decided once, from the headers and shard_size
    # 20 KB shards of float32 tensors: the layout the writers will follow
    assert all(sum(t.nbytes for t in s) <= 20_000 or len(s) == 1 for s in big.layout.shards)
    assert len(big.layout.shards) > 1


def test_ema_save_on_another_disk_is_counted_there(setup: Path) -> None:
    text = (setup / "warp.yaml").read_text().replace("ema: {mu: 0.1, every: 2}",
                                                     "ema: {mu: 0.1, every: 2, save: emas}")
    (setup / "warp.yaml").write_text(text)
    cfg = load_config(setup / "warp.yaml")
    inputs = resolve_inputs(cfg)
    root, emas = cfg.output_root(), (setup / "emas").resolve()
    apart = plan_merge(cfg, inputs, machine_for({root: (1, 10**9), emas: (2, 5)}))
    one = apart.model_bytes
    assert apart.disk_needs() == [DiskNeed(root, 10**9, 2 * one), DiskNeed(emas, 5, 2 * one)]
    together = plan_merge(cfg, inputs, machine_for({root: (1, 10**9), emas: (1, 10**9)}))
    assert together.disk_needs() == [DiskNeed(root, 10**9, 4 * one)]  # one disk: they add up


def test_contributions_and_ema_weights_say_what_they_hold(setup: Path) -> None:
    text = (setup / "warp.yaml").read_text().replace("ema: {mu: 0.1, every: 2}",
                                                     "ema: {mu: 0.5, every: 1, use: last}")
    (setup / "warp.yaml").write_text(text)
    plan = warpmerge.plan(setup / "warp.yaml")
    # use: last -> each run brings its last checkpoint; the EMA itself is 0.5·(1−0.5)^(T−t)
    assert plan.contributions == ((0.0, 1.0), (0.0, 1.0))
    assert plan.ema_weights == ((0.25, 0.5), (0.25, 0.5))
    assert [c.label for c in plan.read_inputs] == [
        "init", "a checkpoint 2 (step-2)", "b checkpoint 2 (step-2)"]


def test_print_plan_is_the_dry_run_text(setup: Path, monkeypatch, capsys) -> None:
    plan = warpmerge.plan(setup / "warp.yaml")
    code, out, _ = run_cli(["run", str(setup / "warp.yaml"), "--dry-run"], monkeypatch, capsys)
    assert code == 0
    assert out == str(plan) + "\nDry run: nothing written.\n"
    assert f"({len(plan.layout.shards)} shard(s))" in str(plan)
    assert not (setup / "out").exists()


def test_plan_reports_input_errors_before_anything_is_written(setup: Path) -> None:
    import shutil

    shutil.rmtree(setup / "run-b" / "step-2")
    with pytest.raises(InputError, match="b checkpoint 2"):
        warpmerge.plan(setup / "warp.yaml")
    assert sorted(p.name for p in setup.iterdir()) == ["init", "run-a", "run-b", "warp.yaml"]
