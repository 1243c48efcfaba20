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

import torch

from .adapters import AdapterCheckpoint, TensorEdit, fuse_low_rank
from .errors import InputError
from .modelfolder import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from .planner import Group, Plan
    from .shards import OutTensor

BLOCK = 1 << 16  # elements per partial sum: fixed, so no setting changes the summation order
RAW_ITEMSIZE = 8  # bytes per element of the widest input dtype (float64)
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


def within(c: Chunk, kept: int) -> bool:
    """Whether chunk `c` lies wholly in a group's first `kept` cached elements."""
    return c.offset + c.count <= kept


@dataclass(frozen=True)
class GroupState:
    """What the kernel knows of the group being merged, fixed for a whole pass.

    `cache`, when set, holds θ_init then δ_1..δ_M, each `stride` elements long: pass 1 computes
    them into it, pass 2 reads them from it instead of the inputs. A group may be cached only
    up to `stride`: the chunks past it are computed in the workspace, in both passes.
    """

    coefs: tuple[float, ...] = ()  # the chain coefficients c_m (pass 2)
    cache: torch.Tensor | None = None
    stride: int = 0

    @staticmethod
    def cache_nbytes(n_runs: int, stride: int) -> int:
        return (n_runs + 1) * 4 * stride

    def holds(self, c: Chunk) -> bool:
        """Whether the cache has room for chunk `c` (it may keep only a group's first chunks)."""
        return self.cache is not None and within(c, self.stride)


class Workspace:
    """One worker thread's buffers: an input's raw bytes, then in float32 θ_init, the task
    vectors, and two for intermediates."""

    def __init__(self, chunk: int, n_runs: int) -> None:
        self.raw = torch.empty(chunk * RAW_ITEMSIZE, dtype=torch.uint8)
        self.init = torch.empty(chunk)
        self.tmp = torch.empty(chunk)
        self.merged = torch.empty(chunk)
        self.deltas = torch.empty((n_runs, chunk))

    @staticmethod
    def nbytes(chunk: int, n_runs: int) -> int:
        return chunk * (RAW_ITEMSIZE + 4 * (3 + n_runs))


class Results:
    """One chunk's output values, one buffer per output model: they travel to the writer."""

    def __init__(self, chunk: int, n_outputs: int, itemsize: int = 4) -> None:
        self.outs = [torch.empty(chunk * itemsize, dtype=torch.uint8) for _ in range(n_outputs)]

    @staticmethod
    def nbytes(chunk: int, n_outputs: int, itemsize: int = 4) -> int:
        """`itemsize`: of the widest output dtype (float64 outputs of a float64 init: 8)."""
        return chunk * itemsize * n_outputs

    def out(self, k: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        return self.outs[k].view(dtype)[:count]


class Kernel:
    """The WARP arithmetic of one merge, per chunk (all inputs read-only)."""

    def __init__(self, plan: Plan) -> None:
        self.init = plan.init
        self.runs = plan.runs
        self.contributions = plan.contributions
        self.ema_weights = plan.ema_weights if plan.ema_root else None
        self.etas = plan.etas
        self.inputs = plan.inputs.all
        self.check_finite = not plan.allow_nonfinite
        self.checked_in_gram = plan.needs_gram  # pass 1's inner products see every NaN
        self.out_dtypes = {t.name: t.dtype for t in plan.out_tensors}
        # runs of adapters only: each tensor's task vector as one low-rank product
        self.fused = _fuse(plan.runs, plan.contributions, plan.out_tensors)
        # only for the runs whose saved EMA is not what they contribute (use: last)
        self.fused_emas = _fuse(plan.runs, tuple(
            e if e != a else (0.0,) * len(e)
            for e, a in zip(self.ema_weights or self.contributions, self.contributions,
                            strict=True)), plan.out_tensors)

    def gram(self, state: GroupState, work: Workspace, results: Results,
             c: Chunk) -> list[list[float]]:
        """Pass 1: block partial sums of ⟨δ_i, δ_j⟩ (i ≤ j), then of ‖θ_init‖²."""
        init, deltas = self.task_vectors(state, work, c)
        vectors = deltas + [init]
        pairs = [(i, j) for i in range(len(deltas)) for j in range(i, len(deltas))]
        pairs.append((len(deltas), len(deltas)))
        sums: list[list[float]] = [[] for _ in pairs]
        for s in range(0, c.count, BLOCK):
            e = min(s + BLOCK, c.count)
            for k, (i, j) in enumerate(pairs):
                sums[k].append(torch.dot(vectors[i][s:e], vectors[j][s:e]).item())
        if self.check_finite and not all(math.isfinite(x) for k in sums for x in k):
            self.find_nonfinite(c)  # a NaN or Inf in θ_init or in any δ_m shows here
        return sums

    def outputs(self, state: GroupState, work: Workspace, results: Results,
                c: Chunk) -> list[torch.Tensor]:
        """Pass 2: θ_init + η·Σ c_m δ_m per η, then θ_init + δ_m per saved EMA."""
        n = c.count
        if state.holds(c):  # pass 1 left them there
            init, deltas = self._places(state, work, c)
        else:
            init, deltas = self.task_vectors(state, work, c)
        merged, tmp = work.merged[:n], work.tmp[:n]
        torch.mul(deltas[0], state.coefs[0], out=merged)
        for coef, d in zip(state.coefs[1:], deltas[1:], strict=True):
            merged.add_(d, alpha=coef)
        if self.check_finite and not self.checked_in_gram and not (
            math.isfinite(merged.sum().item()) and math.isfinite(init.sum().item())
        ):
            self.find_nonfinite(c)
        dtype = self.out_dtypes[c.info.name]
        outs = []
        for k, eta in enumerate(self.etas):
            torch.add(init, merged, alpha=eta, out=tmp)
            outs.append(results.out(k, dtype, n))
            outs[-1].copy_(tmp)
        for m, d in enumerate(deltas if self.ema_weights is not None else []):
            if self.ema_weights[m] != self.contributions[m]:  # `use: last` merges the last
                # checkpoints, but `save` writes the EMAs
                d = self._accumulate(c, work, self.runs[m], self.ema_weights[m], init, merged,
                                     self.fused_emas.get((m, c.info.name)))
                if self.check_finite and not math.isfinite(d.sum().item()):
                    self.find_nonfinite(c)  # a checkpoint the merge itself does not read
            out = results.out(len(self.etas) + m, dtype, n)
            torch.add(init, d, out=tmp)
            out.copy_(tmp)
            outs.append(out)
        return outs

    def task_vectors(self, state: GroupState, work: Workspace,
                     c: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ_init and δ_m = Σ_t a_{m,t}·(θ_{m,t} − θ_init) for one chunk, in float32.

        Differences first: a tensor a run never changed gives an exactly zero δ_m.
        """
        init, targets = self._places(state, work, c)
        _read(self.init, c, init, work)
        deltas = [self._accumulate(c, work, run, coefs, init, d, self.fused.get((m, c.info.name)))
                  for m, (run, coefs, d)
                  in enumerate(zip(self.runs, self.contributions, targets, strict=True))]
        return init, deltas

    def _places(self, state: GroupState, work: Workspace,
                c: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Where a chunk's θ_init and task vectors live: the group cache, or the workspace."""
        n = c.count
        if not state.holds(c):
            return work.init[:n], [work.deltas[m, :n] for m in range(len(self.runs))]
        views = [state.cache[state.stride * k + c.offset:][:n]
                 for k in range(len(self.runs) + 1)]
        return views[0], views[1:]

    def _accumulate(self, c: Chunk, work: Workspace, run: list[Checkpoint], coefs: list[float],
                    init: torch.Tensor, d: torch.Tensor,
                    fused: TensorEdit | None = None) -> torch.Tensor:
        """d = Σ_t a_t·(θ_t − θ_init) over one run's checkpoints, in place (`fused`: the same
        sum as one low-rank product, for a run of plain LoRA adapters)."""
        if fused is not None:
            return d.copy_(fused.delta(c.start, c.count, _no_init))
        tmp = work.tmp[:c.count]
        first = True
        for ckpt, a in zip(run, coefs, strict=True):
            if a == 0.0:
                continue
            target = d if first else tmp
            if isinstance(ckpt, AdapterCheckpoint):
                self._adapter_delta(ckpt, c, target)
            else:
                _read(ckpt, c, target, work)
                target.sub_(init)
            if first:
                if a != 1.0:
                    target.mul_(a)
            else:
                d.add_(tmp, alpha=a)
            first = False
        return d

    def _adapter_delta(self, ckpt: AdapterCheckpoint, c: Chunk, out: torch.Tensor) -> None:
        """θ_t − θ_init of an adapter checkpoint: its ΔW, computed, nothing read but the
        init's rows that DoRA's row norms need."""
        info = self.init.lookup(c.info.name)
        delta = ckpt.delta(info.name, c.start, c.count,
                           lambda start, count: self.init.read(info, start, count).float())
        if delta is None:
            out.zero_()
        else:
            out.copy_(delta)

    def find_nonfinite(self, c: Chunk) -> None:
        """Name the input holding a NaN or Inf in this chunk (a sum overflowing is no error)."""
        for ckpt in self.inputs:
            if isinstance(ckpt, AdapterCheckpoint):
                x = torch.empty(c.count)
                self._adapter_delta(ckpt, c, x)
            else:
                x = ckpt.read(ckpt.lookup(c.info.name), c.start, c.count)
            if not torch.isfinite(x).all():
                raise InputError(f"{ckpt.label}: tensor {c.info.name} contains NaN or Inf "
                                 "(use --allow-nonfinite to merge anyway)")


def _fuse(runs: list[list[Checkpoint]], coefs: tuple[tuple[float, ...], ...],
          tensors: tuple[OutTensor, ...]) -> dict[tuple[int, str], TensorEdit]:
    """(run index, tensor name) -> the run's fused low-rank task vector, for the runs whose
    contributing checkpoints are all adapters (see adapters.fuse_low_rank)."""
    fused = {}
    for m, (run, weights) in enumerate(zip(runs, coefs, strict=True)):
        weighted = [(a, c) for c, a in zip(run, weights, strict=True) if a != 0.0]
        if not weighted or not all(isinstance(c, AdapterCheckpoint) for _, c in weighted):
            continue
        for t in tensors:
            edit = fuse_low_rank(weighted, t.name)
            if edit is not None:
                fused[(m, t.name)] = edit
    return fused


def _no_init(start: int, count: int) -> torch.Tensor:
    raise AssertionError("a plain LoRA product never reads the init")


def _read(ckpt: Checkpoint, c: Chunk, out: torch.Tensor, work: Workspace) -> None:
    out.copy_(ckpt.read_into(ckpt.lookup(c.info.name), c.start, c.count, work.raw))
