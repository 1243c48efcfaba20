"""Streaming the arithmetic: chunks of tensors through reusable buffers, on worker threads.

A chunk is a contiguous run of elements of one tensor. Each worker thread owns a `Scratch` of
chunk-sized buffers, allocated once and used for every chunk it computes, so they stay in that
core's cache (fresh allocations and their page faults, not arithmetic, dominate naive code;
buffers passed between threads cost nearly as much). Workers take several chunks per job, which
keeps hand-offs between threads rare, and run torch single-threaded: parallelism comes from
chunks, never from splitting one op, so the bits of every result are the same whatever the
number of workers.

Reductions are partial sums over fixed blocks of BLOCK elements, aligned to the tensor, and are
combined exactly (math.fsum) in float64: no chunk size or thread count changes the Gram matrix.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import torch

from .errors import InputError
from .modelfolder import Checkpoint, TensorInfo
from .planner import BLOCK, JOB_CHUNKS, Group, Plan, aligned


@dataclass(frozen=True)
class Chunk:
    info: TensorInfo
    start: int  # first element within the tensor
    count: int
    offset: int  # first element within the group's float tensors (cache position)


def chunks(plan: Plan, group: Group, floats: bool) -> Iterator[Chunk]:
    """The chunks of a group's float tensors (floats=True) or of its other tensors."""
    offset = 0
    for info in group.tensors:
        if info.is_float != floats:
            continue
        for start in range(0, info.numel, plan.chunk):
            count = min(plan.chunk, info.numel - start)
            yield Chunk(info, start, count, offset + start)
        offset += aligned(info.numel)


class Scratch:
    """One worker thread's float32 buffers: θ_init, task vectors, and two for intermediates."""

    def __init__(self, plan: Plan) -> None:
        n = plan.chunk
        self.x0 = torch.empty(n)
        self.tmp = torch.empty(n)
        self.merged = torch.empty(n)
        self.deltas = torch.empty((len(plan.runs), n))


class OutBuffers:
    """One chunk's results, one buffer per output model: they travel to the writer."""

    def __init__(self, plan: Plan) -> None:
        self.outs = [torch.empty(plan.chunk * 4, dtype=torch.uint8)
                     for _ in range(plan.n_outputs)]

    def out(self, k: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        return self.outs[k].view(dtype)[:count]


class Streamer:
    """Runs chunk jobs on worker threads and hands results back in order."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.window = plan.threads + 1  # one result being written while `threads` compute
        self.pool = None
        if plan.threads > 1:  # torch's thread setting is per thread (OpenMP): set it in each
            self.pool = ThreadPoolExecutor(plan.threads, initializer=torch.set_num_threads,
                                           initargs=(1,))
        self.free: queue.Queue[list[OutBuffers]] = queue.Queue()  # one per job in flight
        for _ in range(self.window):
            self.free.put([OutBuffers(plan) for _ in range(JOB_CHUNKS)])
        self._scratch: dict[int, Scratch] = {}  # by thread
        self.cache: torch.Tensor | None = None  # this group's θ_init and δ_m, when kept
        self._store: torch.Tensor | None = None  # the memory behind it, reused by every group
        self.cache_numel = 0
        self.coefs: list[float] = []
        self.out_dtypes = {t.name: t.dtype for t in plan.out_tensors}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def scratch(self) -> Scratch:
        """The calling thread's own buffers (each thread only ever adds its own key)."""
        key = threading.get_ident()
        mine = self._scratch.get(key)
        if mine is None:
            mine = self._scratch[key] = Scratch(self.plan)
        return mine

    def ordered(self, fn: Callable, jobs: Iterable[Chunk]) -> Iterator:
        """fn(out_buffers, chunk) for every chunk, results yielded in job order.

        Chunks go to the workers JOB_CHUNKS at a time. The buffers of a yielded result stay
        untouched until the caller asks for the next.
        """
        pending: deque[tuple[list[OutBuffers], Future]] = deque()
        jobs = iter(jobs)

        def batch(slot: list[OutBuffers], cs: list[Chunk]) -> list:
            return [fn(bufs, c) for bufs, c in zip(slot, cs, strict=False)]

        def fill() -> None:
            while len(pending) < self.window:
                cs = list(islice(jobs, JOB_CHUNKS))
                if not cs:
                    return
                slot = self.free.get()
                if self.pool is None:
                    fut: Future = Future()
                    try:
                        fut.set_result(batch(slot, cs))
                    except BaseException as exc:  # re-raised in order, like the pool's
                        fut.set_exception(exc)
                else:
                    fut = self.pool.submit(batch, slot, cs)
                pending.append((slot, fut))

        fill()
        while pending:
            slot, fut = pending.popleft()
            try:
                results = fut.result()
            except BaseException:
                for _, other in pending:
                    other.cancel()
                for _, other in pending:
                    if not other.cancelled():
                        other.exception()  # wait: no worker may outlive its buffers
                raise
            try:
                yield from results
            finally:  # also when the caller stops early: the buffers go back
                self.free.put(slot)
            fill()

    # --- the arithmetic -------------------------------------------------------------------

    def _read(self, ckpt: Checkpoint, c: Chunk, out: torch.Tensor) -> None:
        out.copy_(ckpt.read(ckpt.lookup(c.info.name), c.start, c.count))

    def task_vectors(self, c: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ_init and δ_m = Σ_t a_{m,t}·(θ_{m,t} − θ_init) for one chunk, in float32.

        Computed straight into the group cache when there is one, else into the workspace.
        Differences first: a tensor a run never changed gives an exactly zero δ_m. Only
        elementwise ops, each computing every element the same way wherever a chunk starts or
        ends, so chunking never changes a bit (tests/test_engine.py checks this).
        """
        x0, targets = self._targets(c)
        self._read(self.plan.init, c, x0)
        deltas = [self._accumulate(c, run, coefs, x0, d) for run, coefs, d
                  in zip(self.plan.runs, self.plan.contributions, targets, strict=True)]
        return x0, deltas

    def _targets(self, c: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Where a chunk's θ_init and task vectors live: cache slices, or scratch buffers."""
        n, M = c.count, len(self.plan.runs)
        if self.cache is None:
            mine = self.scratch()
            return mine.x0[:n], [mine.deltas[m, :n] for m in range(M)]
        g = self.cache_numel
        views = [self.cache[g * k + c.offset:][:n] for k in range(M + 1)]
        return views[0], views[1:]

    def _accumulate(self, c: Chunk, run: list[Checkpoint], coefs: list[float],
                    x0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """d = Σ_t a_t·(θ_t − θ_init) over one run's checkpoints, in place."""
        tmp = self.scratch().tmp[:c.count]
        first = True
        for ckpt, a in zip(run, coefs, strict=True):
            if a == 0.0:
                continue
            target = d if first else tmp
            self._read(ckpt, c, target)
            target.sub_(x0)
            if first:
                if a != 1.0:
                    target.mul_(a)
            else:
                d.add_(tmp, alpha=a)
            first = False
        return d

    def gram_job(self, bufs: OutBuffers, c: Chunk) -> list[list[float]]:
        """Pass 1 for one chunk: block partial sums of ⟨δ_i, δ_j⟩ (i ≤ j) and ‖θ_init‖²."""
        x0, deltas = self.task_vectors(c)
        vectors = deltas + [x0]
        pairs = [(i, j) for i in range(len(deltas)) for j in range(i, len(deltas))]
        pairs.append((len(deltas), len(deltas)))
        sums = [[] for _ in pairs]
        for s in range(0, c.count, BLOCK):
            e = min(s + BLOCK, c.count)
            for k, (i, j) in enumerate(pairs):
                sums[k].append(torch.dot(vectors[i][s:e], vectors[j][s:e]).item())
        if not self.plan.allow_nonfinite and not all(math.isfinite(x) for k in sums for x in k):
            self.find_nonfinite(c)  # a NaN or Inf in θ_init or in any δ_m shows here
        return sums

    def write_job(self, bufs: OutBuffers, c: Chunk) -> list[torch.Tensor]:
        """Pass 2 for one chunk: θ_init + η·Σ c_m δ_m per η, then θ_init + δ_m per saved EMA."""
        n = c.count
        if self.cache is not None:  # pass 1 left them there
            x0, deltas = self._targets(c)
        else:
            x0, deltas = self.task_vectors(c)
        mine = self.scratch()
        merged, tmp = mine.merged[:n], mine.tmp[:n]
        torch.mul(deltas[0], self.coefs[0], out=merged)
        for coef, d in zip(self.coefs[1:], deltas[1:], strict=True):
            merged.add_(d, alpha=coef)
        if not (self.plan.allow_nonfinite or self.plan.needs_gram) and not (
            math.isfinite(merged.sum().item()) and math.isfinite(x0.sum().item())
        ):  # with several runs, pass 1's inner products have already looked
            self.find_nonfinite(c)
        dtype = self.out_dtypes[c.info.name]
        outs = []
        for k, eta in enumerate(self.plan.etas):
            torch.add(x0, merged, alpha=eta, out=tmp)
            outs.append(bufs.out(k, dtype, n))
            outs[-1].copy_(tmp)
        for m, d in enumerate(deltas if self.plan.ema_root else []):
            if self.plan.ema_weights[m] != self.plan.contributions[m]:  # `use: last` merges the
                run = self.plan.runs[m]  # last checkpoints, but `save` writes the EMAs
                d = self._accumulate(c, run, self.plan.ema_weights[m], x0, merged)
            out = bufs.out(len(self.plan.etas) + m, dtype, n)
            torch.add(x0, d, out=tmp)
            out.copy_(tmp)
            outs.append(out)
        return outs

    def find_nonfinite(self, c: Chunk) -> None:
        """Name the input holding a NaN or Inf in this chunk (a sum overflowing is no error)."""
        for ckpt in self.plan.inputs.all:
            x = ckpt.read(ckpt.lookup(c.info.name), c.start, c.count)
            if not torch.isfinite(x).all():
                raise InputError(f"{ckpt.label}: tensor {c.info.name} contains NaN or Inf "
                                 "(use --allow-nonfinite to merge anyway)")

    # --- per-group state ------------------------------------------------------------------

    def begin_group(self, group: Group, cache: bool) -> None:
        """Point the cache at this group (allocated once, at the largest size needed)."""
        self.cache_numel = group.cache_numel
        if not cache:
            self.cache = None
            return
        need = self.plan.cache_bytes(group) // 4
        if self._store is None or self._store.numel() < need:
            self._store = torch.empty(need)
        self.cache = self._store[:need]
