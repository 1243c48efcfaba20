"""Streaming a group's chunks through the kernel on worker threads, results in order.

Workers run torch single-threaded: parallelism comes from chunks, never from splitting one op,
so the bits of every result are the same whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .kernel import Chunk, GroupState, Kernel, Results, Workspace, float_chunks
from .planner import JOB_CHUNKS, Group, Plan
from .pool import OrderedPool


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # torch's setting is per thread (OpenMP): set it in each worker


class Streamer:
    """A merge's worker pool, its kernel, and the memory every group's cache reuses."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.kernel = Kernel(plan)
        self.pool: OrderedPool[Workspace, Results] = OrderedPool(
            plan.threads, JOB_CHUNKS, lambda: Workspace(plan.chunk, len(plan.runs)),
            lambda: Results(plan.chunk, plan.n_outputs, plan.out_itemsize),
            init_thread=_one_torch_thread)
        self._store: torch.Tensor | None = None  # allocated once, at the largest size needed

    def close(self) -> None:
        self.pool.close()

    def chunks(self, group: Group) -> list[Chunk]:
        return list(float_chunks(group, self.plan.chunk))

    def cache(self, group: Group) -> GroupState:
        """A state whose cache has room for as much of the group's θ_init and task vectors as
        the plan keeps (see Plan.cached_numel)."""
        stride = self.plan.cached_numel(group)
        need = GroupState.cache_nbytes(len(self.plan.runs), stride) // 4
        if self._store is None or self._store.numel() < need:
            self._store = None  # the old store goes before the new one is made
            self._store = torch.empty(need)
        return GroupState(cache=self._store[:need], stride=stride)

    def gram_sums(self, state: GroupState, chunks: list[Chunk]) -> Iterator[list[list[float]]]:
        """Pass 1: each chunk's block partial sums, in chunk order."""
        return self.pool.map(lambda work, res, c: self.kernel.gram(state, work, res, c), chunks,
                             self._per_job(chunks))

    def outputs(self, state: GroupState, chunks: list[Chunk]) -> Iterator[list[torch.Tensor]]:
        """Pass 2: each chunk's output values (one per output model), in chunk order. They
        stay valid until the next one is asked for."""
        return self.pool.map(lambda work, res, c: self.kernel.outputs(state, work, res, c),
                             chunks, self._per_job(chunks))

    def _per_job(self, chunks: list[Chunk]) -> int:
        """JOB_CHUNKS, or fewer for a group too small to give every thread a full job."""
        return max(1, min(JOB_CHUNKS, -(-len(chunks) // self.plan.threads)))
