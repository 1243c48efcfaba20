"""The ordered worker pool: results in item order, bounded work in flight, per-thread scratch."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import act_when, assert_one_line_error, start_merge

from warpmerge.pool import OrderedPool


class Scratch:
    def __init__(self) -> None:
        self.owner = threading.get_ident()


def make_pool(threads: int, per_job: int = 3) -> OrderedPool:
    return OrderedPool(threads, per_job, Scratch, lambda: [])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_back_in_item_order(threads):
    pool = make_pool(threads)

    def fn(scratch, holder, x):
        time.sleep(0.001 * (x % 3 == 0))  # late finishers must not overtake
        return x * x

    try:
        assert list(pool.map(fn, range(50))) == [x * x for x in range(50)]
        assert list(pool.map(fn, range(7))) == [x * x for x in range(7)]  # reusable
    finally:
        pool.close()


def test_each_thread_keeps_its_own_scratch():
    pool = make_pool(3, per_job=1)
    seen: list[tuple[int, int]] = []

    def fn(scratch, holder, x):
        seen.append((threading.get_ident(), scratch.owner))
        time.sleep(0.002)
        return x

    try:
        list(pool.map(fn, range(30)))
    finally:
        pool.close()
    assert all(thread == owner for thread, owner in seen)
    assert len(pool._scratch) == len({t for t, _ in seen}) > 1


def test_work_in_flight_is_bounded_and_holders_are_reused():
    """At most threads + 1 jobs are computed ahead; a holder is reused only once its result
    has been handed on."""
    threads, per_job = 2, 2
    pool = OrderedPool(threads, per_job, Scratch, lambda: [])
    computed: list[int] = []
    holders: set[int] = set()

    def fn(scratch, holder, x):
        holder.append(x)
        holders.add(id(holder))
        computed.append(x)
        return holder

    try:
        results = pool.map(fn, range(100))
        first = next(results)
        time.sleep(0.05)  # let the workers run as far ahead as they may
        assert len(computed) <= (threads + 1) * per_job
        assert first == [0]  # untouched while the caller holds it
        rest = [holder[-1] for holder in results]  # read before asking for the next
    finally:
        pool.close()
    assert rest == list(range(1, 100))
    assert len(holders) == (threads + 1) * per_job


def test_smaller_jobs_on_request_spread_a_short_stream_over_the_threads():
    """A group of 4 chunks is one job at 4 per job (one busy thread); at 2 per job, two."""
    count = iter(range(10**6))
    pool = OrderedPool(2, 4, Scratch, lambda: next(count))  # holder k of a slot: k mod 4
    threads: list[int] = []

    def fn(scratch, holder, x):
        threads.append(threading.get_ident())
        time.sleep(0.02)  # long enough that the second thread takes the second job
        return holder % 4

    try:
        assert list(pool.map(fn, range(6))) == [0, 1, 2, 3, 0, 1]
        assert list(pool.map(fn, range(6), per_job=2)) == [0, 1, 0, 1, 0, 1]
        assert list(pool.map(fn, range(3), per_job=8)) == [0, 1, 2]  # never above the pool's
        threads.clear()
        list(pool.map(fn, range(4), per_job=2))
        assert len(set(threads)) == 2
    finally:
        pool.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_an_error_comes_out_in_order_and_the_pool_stays_usable(threads):
    pool = make_pool(threads, per_job=2)

    def fn(scratch, holder, x):
        if x == 7:
            raise ValueError("seven")
        return x

    got = []
    try:
        with pytest.raises(ValueError, match="seven"):
            for x in pool.map(fn, range(20)):
                got.append(x)
        assert got == list(range(6))  # every job before the failing one (items 6 and 7)
        assert list(pool.map(lambda s, h, x: x, range(10))) == list(range(10))
        # stopping early gives every holder back too
        early = pool.map(lambda s, h, x: x, range(100))
        assert next(early) == 0
        early.close()
        assert list(pool.map(lambda s, h, x: x, range(10))) == list(range(10))
    finally:
        pool.close()


# --- inputs that change under a running merge -------------------------------------------------

CHANGING_YAML = """\
init: init
policies:
  - {name: a, checkpoints: [run-a/step-1, run-a/step-2]}
  - {name: b, checkpoints: [run-b/step-1, run-b/step-2]}
ema: {mu: 0.2}
output: {path: out, shard_size: 4MB}
"""
LAYERS, H = 8, 1024  # 8 groups of one 4 MB tensor, a shard each


@pytest.fixture(scope="module")
def changing_base(tmp_path_factory) -> Path:
    """init + 2 runs x 2 checkpoints, float32, 33 MB each (drift: rolled copies of one noise)."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("changing")
    noise = torch.randn(H * H, generator=torch.Generator().manual_seed(0))
    init = {f"model.layers.{i}.mlp.weight": torch.roll(noise, 7919 * i).view(H, H) * 0.1
            for i in range(LAYERS)}
    models = {"init": init}
    for r, run in enumerate("ab"):
        cur = init
        for t in (1, 2):
            cur = {k: v + 0.01 * torch.roll(noise, 104729 * (2 * r + t)).view(H, H)
                   for k, v in cur.items()}
            models[f"run-{run}/step-{t}"] = cur
    for name, tensors in models.items():
        (root / name).mkdir(parents=True)
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    (root / "warp.yaml").write_text(CHANGING_YAML)
    return root


def _change(path: Path, how: str) -> None:
    if how == "truncated":  # as a crashed or killed save leaves it
        os.truncate(path, path.stat().st_size // 2)
    elif how == "replaced":  # a new file renamed over it, same size (a re-save)
        fresh = path.with_name("fresh.tmp")
        shutil.copyfile(path, fresh)
        os.replace(fresh, path)
    else:  # save_total_limit deleting it
        path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "replaced", "deleted"])
def test_an_input_changed_mid_run_fails_cleanly_naming_it(changing_base, tmp_path, how):
    """Changed once the first output shard exists: exit 1, one line naming the file, and
    neither the output nor its staging folder left behind."""
    root = tmp_path / "setup"
    shutil.copytree(changing_base, root, copy_function=os.link)  # the victim gets a real copy
    victim = root / "run-b" / "step-2" / "model.safetensors"
    victim.unlink()
    shutil.copyfile(changing_base / "run-b" / "step-2" / "model.safetensors", victim)
    out = root / "out"
    proc = start_merge(root, out, "--threads", "2")
    first_shard = root / ".out.warpmerge-partial" / "model-00001-of-00008.safetensors"
    stdout, err = act_when(proc, first_shard.exists, lambda: _change(victim, how))
    assert proc.returncode == 1, err
    assert_one_line_error(err, str(victim), how)
    assert stdout == b""
    assert sorted(p.name for p in root.iterdir()) == ["init", "run-a", "run-b", "warp.yaml"]


def test_reads_are_exact_and_a_truncated_file_is_a_short_read(changing_base, tmp_path):
    import torch
    from safetensors.torch import load_file

    from warpmerge.errors import RunError
    from warpmerge.modelfolder import open_checkpoint

    folder = tmp_path / "m"
    shutil.copytree(changing_base / "run-a" / "step-1", folder)
    ckpt = open_checkpoint(folder, "ckpt")
    ckpt.open_files()
    try:
        want = load_file(str(folder / "model.safetensors"))
        name = "model.layers.7.mlp.weight"
        raw = torch.empty(8 * 5000, dtype=torch.uint8)
        got = ckpt.read_into(ckpt.tensors[name], 123_456, 5000, raw)
        assert torch.equal(got, want[name].flatten()[123_456:128_456])
        ckpt.check_unchanged()
        os.truncate(folder / "model.safetensors", ckpt.tensors[name].offset + 1000)
        with pytest.raises(RunError, match=f"ckpt: {folder / 'model.safetensors'} was truncated"):
            ckpt.read_into(ckpt.tensors[name], 123_456, 5000, raw)
        with pytest.raises(RunError, match="was truncated during the merge"):
            ckpt.check_unchanged()
    finally:
        ckpt.close()
