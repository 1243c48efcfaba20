"""The merge's arithmetic on one chunk: task vectors, Gram block sums, output values.

A chunk is a contiguous run of elements of one tensor. The kernel computes a chunk from the
inputs' bytes, a worker's `Workspace` and a `GroupState` that is fixed for the whole pass, and
writes nothing else: so which thread computes a chunk, or in which order, never matters.

Every element is computed the same way wherever a chunk starts or ends, and reductions are
partial sums over fixed blocks of BLOCK elements aligned to the tensor (chunks are whole
blocks), combined exactly in float64 by the caller: no chunk size or thread count changes a
bit of the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import fused
from .errors import InputError
from .sources import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from .plan import Group, Plan

BLOCK = 1 << 16  # elements per partial sum: fixed, so no setting changes the summation order
CACHE_ALIGN = 64  # elements: a chunk sits at the same alignment in the cache as in a workspace


def aligned(n: int) -> int:
    return -(-n // CACHE_ALIGN) * CACHE_ALIGN


@dataclass(frozen=True)
class Chunk:
    info: TensorInfo
    start: int  # first element within the tensor
    count: int
    offset: int  # first element within the group's float tensors (its place in the cache)


def float_chunks(group: Group, chunk: int) -> Iterator[Chunk]:
    """The chunks of a group's float tensors, in order; `chunk` is a multiple of BLOCK."""
    offset = 0
    for info in group.tensors:
        if not info.is_float:
            continue
        for start in range(0, info.numel, chunk):
            yield Chunk(info, start, min(chunk, info.numel - start), offset + start)
        offset += aligned(info.numel)


@dataclass(frozen=True)
class GroupState:
    """What the kernel knows of the group being merged, fixed for a whole pass.

    `cache`, when set, has a row for θ_init then one per δ_m, each `group.cache_numel` long:
    pass 1 computes them into it, pass 2 reads them from it instead of the inputs.
    """

    coefs: tuple[float, ...] = ()  # the chain coefficients c_m (pass 2)
    cache: np.ndarray | None = None

    @staticmethod
    def cache_nbytes(n_runs: int, stride: int) -> int:
        return (n_runs + 1) * 4 * stride


@dataclass(frozen=True)
class Layout:
    """The shapes of a merge's chunk buffers, fixed by the plan (see `Plan.workspace_bytes`).

    Rows are the inputs the kernel reads: θ_init first, then every checkpoint with a weight
    in the merge or, when EMAs are saved, in its EMA.
    """

    chunk: int
    rows: int
    runs: int
    outputs: int
    raw_itemsize: int  # the widest input dtype's
    ema_rows: int  # saved EMAs recomputed from the inputs (`use: last`), else 0
    converts: bool  # some inputs or outputs are neither bf16 nor float32: converted apart

    @classmethod
    def of(cls, plan: Plan) -> Layout:
        rows = _row_inputs(plan)
        widest = max(t.dtype.itemsize for c in rows for t in c.tensors.values() if t.is_float)
        dtypes = {t.dtype for c in rows for t in c.tensors.values() if t.is_float}
        dtypes |= {t.dtype for t in plan.out_tensors if t.dtype.is_floating_point}
        recompute = bool(plan.ema_root) and plan.save_coefs != plan.ema_coefs
        return cls(plan.chunk, len(rows), len(plan.runs), plan.n_outputs, max(widest, 4),
                   len(plan.runs) if recompute else 0,
                   not dtypes <= {torch.bfloat16, torch.float32})

    @property
    def workspace_nbytes(self) -> int:
        floats = (self.runs + 1) + self.ema_rows + (self.rows + self.outputs) * self.converts
        return self.chunk * (self.rows * self.raw_itemsize + 4 * floats) + 12 * fused.SUB

    @property
    def results_nbytes(self) -> int:
        return self.chunk * 4 * self.outputs


class Workspace:
    """One worker thread's buffers: the rows' raw bytes, θ_init and the task vectors in
    float32, and the small sub-block buffers of the compiled loops."""

    def __init__(self, layout: Layout) -> None:
        n = layout.chunk
        self.raw = torch.empty((layout.rows, n * layout.raw_itemsize), dtype=torch.uint8)
        self.vecs = np.empty((layout.runs + 1, n), dtype=np.float32)
        self.emas = np.empty((layout.ema_rows, n), dtype=np.float32)
        self.bits = np.empty(fused.SUB, dtype=np.uint32)
        self.merged = np.empty(fused.SUB, dtype=np.float32)
        self.tmp = np.empty(fused.SUB, dtype=np.float32)
        self.floats, self.tmp_bits = self.bits.view(np.float32), self.tmp.view(np.uint32)
        converts = layout.converts
        self.converted = np.empty((layout.rows * converts, n), dtype=np.float32)
        self.staged = np.empty((layout.outputs * converts, n), dtype=np.float32)


class Results:
    """One chunk's output values, one row per output model: they travel to the writer."""

    def __init__(self, layout: Layout) -> None:
        self.bytes = torch.empty((layout.outputs, layout.chunk * 4), dtype=torch.uint8)

    def out(self, k: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        return self.bytes[k].view(dtype)[:count]


_STORED = {torch.bfloat16: np.uint16, torch.float32: np.float32}  # written by the loops


class Kernel:
    """The WARP arithmetic of one merge, per chunk (all inputs read-only)."""

    def __init__(self, plan: Plan) -> None:
        self.rows = _row_inputs(plan)
        self.inputs = plan.inputs
        index = {id(c): r for r, c in enumerate(self.rows)}
        self.merge_rows, self.merge_coefs, self.starts = _run_rows(plan.runs, plan.ema_coefs,
                                                                   index)
        self.save_rows: list[tuple[np.ndarray, np.ndarray]] = []
        if plan.ema_root and plan.save_coefs != plan.ema_coefs:  # `use: last` merges the last
            for run, coefs in zip(plan.runs, plan.save_coefs, strict=True):  # checkpoints,
                rows, cs, _ = _run_rows([run], [coefs], index)  # but `save` writes the EMAs
                self.save_rows.append((rows, cs))
        M = len(plan.runs)
        self.pairs = M * (M + 1) // 2 + 1
        self.etas = np.array(plan.etas, dtype=np.float32)
        self.ema_rows = (np.arange(len(self.save_rows), dtype=np.int64) if self.save_rows
                         else np.arange(1, M + 1, dtype=np.int64) if plan.ema_root
                         else np.zeros(0, dtype=np.int64))
        self.check_finite = not plan.allow_nonfinite
        self.checked_in_gram = plan.needs_gram  # pass 1's inner products see every NaN
        self.out_dtypes = {t.name: t.dtype for t in plan.out_tensors}

    def gram(self, state: GroupState, work: Workspace, results: Results,
             c: Chunk) -> list[list[float]]:
        """Pass 1: block partial sums of ⟨δ_i, δ_j⟩ (i ≤ j), then of ‖θ_init‖²."""
        sums = np.zeros((self.pairs, -(-c.count // BLOCK)))
        self._task_vectors(state, work, c, self._read(work, c), sums)
        if self.check_finite and not np.isfinite(sums).all():
            self.find_nonfinite(c)  # a NaN or Inf in θ_init or in any δ_m shows here
        return sums.tolist()

    def outputs(self, state: GroupState, work: Workspace, results: Results,
                c: Chunk) -> list[torch.Tensor]:
        """Pass 2: θ_init + η·Σ c_m δ_m per η, then θ_init + δ_m per saved EMA."""
        n = c.count
        raw = None
        if state.cache is not None:  # pass 1 left them there
            vecs, off = state.cache, c.offset
        else:
            raw = self._read(work, c)
            vecs, off = self._task_vectors(state, work, c, raw, np.zeros((self.pairs, 0)))
        emas, ema_off = vecs, off
        if self.save_rows:
            raw = self._read(work, c) if raw is None else raw
            for d, (rows, coefs) in zip(work.emas, self.save_rows, strict=True):
                fused.ema_delta(raw, rows, coefs, n, vecs, off, d, work.bits, work.floats)
            emas, ema_off = work.emas, 0
        dtype = self.out_dtypes[c.info.name]
        stored = _STORED.get(dtype)
        outs = work.staged if stored is None else results.bytes.numpy().view(stored)
        check = fused.outputs(vecs, off, np.array(state.coefs, dtype=np.float32), self.etas,
                              n, outs, emas, self.ema_rows, ema_off, work.merged, work.tmp,
                              work.tmp_bits)
        if self.check_finite and not self.checked_in_gram and not math.isfinite(check):
            self.find_nonfinite(c)
        views = [results.out(k, dtype, n) for k in range(len(results.bytes))]
        if stored is None:
            for view, staged in zip(views, work.staged, strict=True):
                view.copy_(torch.from_numpy(staged[:n]))
        return views

    def _task_vectors(self, state: GroupState, work: Workspace, c: Chunk, raw: np.ndarray,
                      sums: np.ndarray) -> tuple[np.ndarray, int]:
        """θ_init and δ_m = Σ_t a_{m,t}·(θ_{m,t} − θ_init) into the cache or the workspace.

        Differences first: a tensor a run never changed gives an exactly zero δ_m.
        """
        vecs, off = (state.cache, c.offset) if state.cache is not None else (work.vecs, 0)
        fused.task_vectors(raw, self.merge_rows, self.merge_coefs, self.starts, c.count, vecs,
                           off, sums, BLOCK, work.bits, work.floats)
        return vecs, off

    def _read(self, work: Workspace, c: Chunk) -> np.ndarray:
        """Every row's bytes of the chunk: uint16 bf16 bits, float32, or converted to float32
        (mixed or other dtypes)."""
        infos = [ckpt.lookup(c.info.name) for ckpt in self.rows]
        for ckpt, info, raw in zip(self.rows, infos, work.raw, strict=True):
            ckpt.read_into(info, c.start, c.count, raw)
        dtypes = {info.dtype for info in infos}
        if len(dtypes) == 1 and (stored := _STORED.get(dtypes.pop())) is not None:
            return work.raw.numpy().view(stored)
        for info, raw, out in zip(infos, work.raw, work.converted, strict=True):
            torch.from_numpy(out[:c.count]).copy_(raw[:c.count * info.dtype.itemsize]
                                                  .view(info.dtype))
        return work.converted

    def find_nonfinite(self, c: Chunk) -> None:
        """Name the input holding a NaN or Inf in this chunk (a sum overflowing is no error)."""
        for ckpt in self.inputs:
            x = ckpt.read(ckpt.lookup(c.info.name), c.start, c.count)
            if not torch.isfinite(x).all():
                raise InputError(f"{ckpt.label}: tensor {c.info.name} contains NaN or Inf "
                                 "(use --allow-nonfinite to merge anyway)")


def _row_inputs(plan: Plan) -> list[Checkpoint]:
    """θ_init, then each checkpoint weighing in the merge or in a saved EMA."""
    saved = plan.save_coefs if plan.ema_root else [[0.0] * len(r) for r in plan.runs]
    return [plan.init] + [c for run, a, s in zip(plan.runs, plan.ema_coefs, saved, strict=True)
                          for c, w, v in zip(run, a, s, strict=True) if w or v]


def _run_rows(runs: list[list[Checkpoint]], coefs: list[list[float]],
              index: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs' weighted checkpoints as (rows, float32 weights, where each run starts)."""
    rows, weights, starts = [], [], [0]
    for run, a in zip(runs, coefs, strict=True):
        for ckpt, w in zip(run, a, strict=True):
            if w != 0.0:
                rows.append(index[id(ckpt)])
                weights.append(w)
        starts.append(len(rows))
    return (np.array(rows, dtype=np.int64), np.array(weights, dtype=np.float32),
            np.array(starts, dtype=np.int64))
