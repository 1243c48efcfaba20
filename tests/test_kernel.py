"""The chunk kernel on its own: chunk layout, Gram block sums against float64, buffer sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, perturb, random_model, write_model

import warpmerge
from warpmerge.config import build_config
from warpmerge.kernel import (
    BLOCK,
    CACHE_ALIGN,
    GroupState,
    Kernel,
    Results,
    Workspace,
    float_chunks,
)
from warpmerge.planner import JOB_CHUNKS

BIG = dict(TINY, vocab_size=1000, hidden_size=160, intermediate_size=320, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=1, head_dim=80)  # 160,000-element tensors
MU = 0.3


def make_plan(tmp_path: Path, chunk: int | None = None, threads: int = 1, **output):
    init = random_model(0, BIG)
    init["model.position_ids"] = torch.arange(7)  # not float: no chunks, no cache room
    write_model(tmp_path / "init", init, BIG)
    runs = []
    for r in range(2):
        cur, run = init, []
        for t in range(2):
            cur = perturb({k: v for k, v in cur.items() if v.is_floating_point()}, 10 * r + t,
                          0.02)
            cur["model.position_ids"] = init["model.position_ids"]
            write_model(tmp_path / f"run{r}" / f"step-{t}", cur, BIG)
            run.append(cur)
        runs.append(run)
    cfg = build_config(init="init", policies=[{"checkpoints": f"run{r}/step-*"} for r in range(2)],
                       ema={"mu": MU}, slerp={"granularity": "model"},
                       output={"path": "out", **output}).with_base_dir(tmp_path)
    plan = warpmerge.plan(cfg, chunk=chunk, threads=threads)
    return plan, init, runs


def test_chunks_cover_each_float_tensor_once_at_aligned_cache_offsets(tmp_path):
    plan, init, _ = make_plan(tmp_path, chunk=BLOCK)
    (group,) = plan.groups
    chunks = list(float_chunks(group, plan.chunk))
    floats = [t for t in group.tensors if t.is_float]
    assert {c.info.name for c in chunks} == {t.name for t in floats}
    offset = 0
    for t in floats:
        mine = [c for c in chunks if c.info.name == t.name]
        assert [c.start for c in mine] == list(range(0, t.numel, BLOCK))
        assert sum(c.count for c in mine) == t.numel
        assert all(c.offset == offset + c.start for c in mine)
        assert offset % CACHE_ALIGN == 0
        offset += -(-t.numel // CACHE_ALIGN) * CACHE_ALIGN
    assert offset == group.cache_numel


def block_sums(plan, cached: bool) -> dict[tuple[str, int], list[float]]:
    """Pass 1 over the plan's one group: each BLOCK's partial sums, by (tensor, start)."""
    (group,) = plan.groups
    kernel = Kernel(plan)
    state = GroupState()
    if cached:
        store = torch.empty(GroupState.cache_nbytes(2, group.cache_numel) // 4)
        state = GroupState(cache=store, stride=group.cache_numel)
    work, results = Workspace(plan.chunk, 2), Results(plan.chunk, plan.n_outputs)
    per_block: dict[tuple[str, int], list[float]] = {}
    for c in float_chunks(group, plan.chunk):
        sums = kernel.gram(state, work, results, c)
        for b in range(len(sums[0])):
            per_block[(c.info.name, c.start + b * BLOCK)] = [k[b] for k in sums]
    return per_block


def test_gram_block_sums_match_float64_and_not_the_chunking(tmp_path):
    """Summed, the partial sums are ⟨δ_i, δ_j⟩ and ‖θ_init‖² (float64 reference of the spec's
    EMA); each BLOCK's sum is the same bits whatever the chunk size, cached or not."""
    plan, init, runs = make_plan(tmp_path, chunk=BLOCK)
    per_block = block_sums(plan, cached=False)
    for chunk, cached in [(3 * BLOCK, False), (BLOCK, True), (5 * BLOCK, True)]:
        other = warpmerge.plan(plan.config, chunk=chunk, threads=1)
        assert block_sums(other, cached) == per_block, (chunk, cached)
    names = [t.name for t in plan.groups[0].tensors if t.is_float]
    deltas = []
    for run in runs:
        d = []
        for name in names:
            x0 = init[name].double().flatten()
            ema = x0
            for ckpt in run:
                ema = (1 - MU) * ema + MU * ckpt[name].double().flatten()
            d.append(ema - x0)
        deltas.append(torch.cat(d))
    x0 = torch.cat([init[n].double().flatten() for n in names])
    want = [deltas[0] @ deltas[0], deltas[0] @ deltas[1], deltas[1] @ deltas[1], x0 @ x0]
    got = [math.fsum(v[k] for v in per_block.values()) for k in range(4)]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(float(w), rel=2e-6)


def test_workspace_bytes_are_the_buffers_the_streamer_makes(tmp_path):
    from warpmerge.stream import Streamer

    plan, _, _ = make_plan(tmp_path, chunk=2 * BLOCK, threads=2, dtype="bfloat16")
    streamer = Streamer(plan)
    try:
        work = streamer.pool.scratch()
        held = sum(t.numel() * t.element_size() for t in vars(work).values())
        slots = [streamer.pool._slots.get() for _ in range(streamer.pool.in_flight)]
        res = sum(t.numel() * t.element_size() for slot in slots for r in slot for t in r.outs)
    finally:
        streamer.close()
    assert len(slots) == plan.threads + 1 and all(len(s) == JOB_CHUNKS for s in slots)
    assert held * plan.threads + res == plan.workspace_bytes()
