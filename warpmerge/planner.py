"""Planning a merge: a pure function of the config, the opened inputs and a machine snapshot.

The plan decides everything before the first tensor byte is read: the groups that share a SLERP
angle, what each checkpoint contributes, the output layout, chunk size, memory budget, and the
bytes to read and write. Nothing here reads a file or asks the system (resolve.py opened the
inputs, probes.py measured the machine), so every decision can be tested as data, and
`print(plan)` is the dry-run text (dryrun.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .adapters import AdapterCheckpoint
from .config import WarpConfig
from .kernel import BLOCK, Chunk, GroupState, Results, Workspace, aligned, float_chunks, within
from .modelfolder import FLOAT_DTYPES, HEAD_NAME, Checkpoint, TensorInfo
from .ops import ema_coefficients
from .probes import Machine
from .resolve import Input, Inputs
from .shards import OutTensor, ShardLayout, plan_shards

DEFAULT_CHUNK = 1 << 18  # elements per chunk: a worker's buffers stay in the CPU cache
JOB_CHUNKS = 4  # chunks per worker job: a hand-off between threads costs more than a chunk
LAYER = re.compile(r"^(.*?layers\.\d+)\.")


@dataclass(frozen=True)
class Group:
    """Tensors sharing one SLERP angle."""

    name: str
    tensors: tuple[TensorInfo, ...]

    @property
    def float_numel(self) -> int:
        return sum(t.numel for t in self.tensors if t.is_float)

    @property
    def cache_numel(self) -> int:
        """Elements of one cached vector of the group: each tensor starts CACHE_ALIGN-aligned,
        so a chunk sits at the same memory alignment in the cache as in a work buffer (and
        vectorized reductions see the same data layout)."""
        return sum(aligned(t.numel) for t in self.tensors if t.is_float)


@dataclass(frozen=True)
class DiskNeed:
    """Bytes a merge writes to one disk, against the free bytes measured there."""

    where: Path
    free: int
    needed: int

    @property
    def missing(self) -> int:
        return max(0, self.needed - self.free)


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first tensor byte is read."""

    config: WarpConfig
    inputs: Inputs
    run_names: tuple[str, ...]
    # a_{m,t}: P_m − θ_init = Σ_t a_{m,t}·(θ_{m,t} − θ_init), what run m brings to the SLERP
    # (its EMA, or one-hot on its last checkpoint under `use: last`)
    contributions: tuple[tuple[float, ...], ...]
    ema_weights: tuple[tuple[float, ...], ...]  # the same for each run's EMA, for `ema.save`
    groups: tuple[Group, ...]
    layout: ShardLayout  # of every output model
    output_root: Path
    output_dirs: tuple[Path, ...]  # one per η
    etas: tuple[float, ...]
    ema_root: Path | None
    chunk: int
    max_memory: int
    threads: int
    allow_nonfinite: bool
    warnings: tuple[str, ...]
    machine: Machine
    download_dir: Path | None = None  # the Hub cache, when inputs are still to be downloaded

    def __str__(self) -> str:
        from .dryrun import describe_plan

        return describe_plan(self)

    @property
    def init(self) -> Checkpoint:
        return self.inputs.init

    @property
    def runs(self) -> list[list[Input]]:
        return self.inputs.runs

    @property
    def model_config(self) -> dict | None:
        """The init's config.json, copied into each output with the dtype updated."""
        return self.inputs.model_config

    @property
    def license(self) -> str | None:
        return self.inputs.license

    @property
    def out_tensors(self) -> tuple[OutTensor, ...]:
        return self.layout.tensors

    @cached_property
    def read_inputs(self) -> list[Input]:
        """The inputs whose bytes the merge reads: checkpoints that contribute nothing (to the
        merge, nor to a saved EMA) are not."""
        saved = self.ema_weights if self.ema_root else self.contributions
        used = [c for run, a, e in zip(self.runs, self.contributions, saved, strict=True)
                for c, w, v in zip(run, a, e, strict=True) if w != 0.0 or v != 0.0]
        return [self.init] + used

    @cached_property
    def out_itemsize(self) -> int:
        """Bytes per element of the widest float output (the kernel's result buffers)."""
        return max((t.dtype.itemsize for t in self.layout.tensors if t.dtype.is_floating_point),
                   default=4)

    @property
    def n_outputs(self) -> int:
        """Models written: one per η, plus one per run when EMAs are saved."""
        return len(self.etas) + (len(self.runs) if self.ema_root else 0)

    @property
    def model_bytes(self) -> int:
        """The bytes of one output model."""
        return self.layout.total_bytes

    @property
    def out_bytes(self) -> int:
        return self.model_bytes * self.n_outputs

    @property
    def needs_gram(self) -> bool:
        return len(self.runs) > 1

    def workspace_bytes(self) -> int:
        """The chunk buffers: each worker's scratch, and the results of the jobs in flight."""
        workspace = Workspace.nbytes(self.chunk, len(self.runs))
        results = Results.nbytes(self.chunk, self.n_outputs, self.out_itemsize) * JOB_CHUNKS
        return workspace * self.threads + results * (self.threads + 1)

    def adapter_bytes(self) -> int:
        """The adapters' factors in memory, counted twice: as read, and as each run's fused
        product (kernel._fuse), an upper bound."""
        return 2 * sum(c.adapter.nbytes for c in self.inputs.all
                       if isinstance(c, AdapterCheckpoint))

    def cached_numel(self, group: Group) -> int:
        """Elements of each of the group's vectors (θ_init, δ_1..δ_M) that pass 1 keeps for
        pass 2: all of them when they fit the memory budget (less the work buffers and the
        adapters' factors), else the longest prefix that does.

        The chunks past it are read again in pass 2. Keeping a prefix, rather than nothing,
        spares that second read in proportion: it is what the budget buys on a group too big
        to keep whole, such as a 256K-vocabulary embedding. Spilling the task vectors to disk
        instead would write and read back 8 bytes per element and run, more than reading the
        bf16 inputs again costs unless runs have over four checkpoints each.
        """
        return min(group.cache_numel, self._cache_room) if self.needs_gram else 0

    @cached_property
    def _cache_room(self) -> int:
        """Elements per cached vector that the budget leaves room for."""
        per_element = GroupState.cache_nbytes(len(self.runs), 1)
        return max(0, self.max_memory - self.workspace_bytes()
                   - self.adapter_bytes()) // per_element

    def cacheable(self, group: Group) -> bool:
        """Whether pass 1 keeps all of the group's task vectors, so that pass 2 reads nothing."""
        return self.cached_numel(group) == group.cache_numel

    def chunk_read_bytes(self, c: Chunk) -> int:
        """Bytes one pass reads from the inputs for chunk `c`."""
        return (c.count * sum(ck.read_nbytes(c.info.name) for ck in self.read_inputs)
                // c.info.numel)

    def float_read_bytes(self, group: Group) -> int:
        """Bytes one pass over the group's float tensors reads from the inputs."""
        return sum(c.read_nbytes(t.name) for t in group.tensors if t.is_float
                   for c in self.read_inputs)

    def read_bytes(self) -> int:
        """Bytes read from disk: pass 1 (when needed) plus pass 2 for the chunks not cached."""
        total = 0
        for g in self.groups:
            total += self.float_read_bytes(g)
            if self.needs_gram and not self.cacheable(g):
                kept = self.cached_numel(g)
                total += sum(self.chunk_read_bytes(c) for c in float_chunks(g, self.chunk)
                             if not within(c, kept))
            total += sum(t.nbytes for t in g.tensors if not t.is_float)
        return total

    def disk_needs(self, machine: Machine | None = None) -> list[DiskNeed]:
        """Bytes to write on each disk: the merged models go to output.path, the saved EMAs
        to ema.save, which may be another disk; two paths on one disk add up. `machine`: a
        fresh snapshot (the engine's, just before writing); by default the plan's."""
        machine = machine or self.machine
        targets = [(self.output_root, self.model_bytes * len(self.etas))]
        if self.ema_root is not None:
            targets.append((self.ema_root, self.model_bytes * len(self.runs)))
        disks: dict[int, DiskNeed] = {}
        for root, nbytes in targets:
            space = machine.free_at(root)
            prior = disks.get(space.device, DiskNeed(space.where, space.free, 0))
            disks[space.device] = DiskNeed(prior.where, prior.free, prior.needed + nbytes)
        return list(disks.values())


def group_key(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        m = LAYER.match(name)
        if m:
            return m.group(1)
    return name


def make_groups(tensors: list[TensorInfo], granularity: str) -> tuple[Group, ...]:
    groups: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        groups.setdefault(group_key(t.name, granularity), []).append(t)
    return tuple(Group(key, tuple(members)) for key, members in groups.items())


def default_max_memory(available: int) -> int:
    """A quarter of the memory available now, between 256 MiB and 2 GiB."""
    return min(max(available // 4, 256 * 2**20), 2 * 2**30)


def plan_merge(config: WarpConfig, inputs: Inputs, machine: Machine, *,
               out: Path | None = None, chunk: int | None = None,
               max_memory: int | None = None, threads: int | None = None,
               allow_nonfinite: bool = False, download_dir: Path | None = None) -> Plan:
    """Decide groups, EMA weights and the output layout for these inputs on this machine."""
    init = inputs.init
    out_dtype = FLOAT_DTYPES.get(config.output.dtype) if config.output.dtype else None
    groups = make_groups(list(init.tensors.values()), config.slerp.granularity)
    out_tensors = [
        OutTensor(t.name, out_dtype if (out_dtype and t.is_float) else t.dtype, t.shape)
        for g in groups for t in g.tensors
    ]
    ema = config.ema
    return Plan(
        config=config, inputs=inputs, run_names=tuple(config.run_names),
        contributions=tuple(tuple(ema_coefficients(len(s), ema.mu, 1, ema.start, ema.use, s))
                            for s in inputs.steps),
        ema_weights=tuple(tuple(ema_coefficients(len(s), ema.mu, 1, ema.start, steps=s))
                          for s in inputs.steps),
        groups=groups, layout=plan_shards(out_tensors, config.output.shard_size),
        output_root=config.output_root(out), output_dirs=tuple(config.output_dirs(out)),
        etas=tuple(config.liti.eta),
        ema_root=config.resolve_path(config.ema.save).resolve() if config.ema.save else None,
        chunk=max(BLOCK, ((chunk or DEFAULT_CHUNK) // BLOCK) * BLOCK),
        max_memory=max_memory or default_max_memory(machine.available_memory),
        threads=threads or machine.cpus, allow_nonfinite=allow_nonfinite,
        warnings=_warnings(inputs),
        machine=machine, download_dir=download_dir,
    )


def _warnings(inputs: Inputs) -> tuple[str, ...]:
    """What the user should know before merging; nothing here stops the merge."""
    tied = HEAD_NAME not in inputs.init.tensors
    head = [f"{c.label}: has its own {HEAD_NAME}, but the init ties it to the embedding; "
            "the output stays tied and that tensor is not merged"
            for c in inputs.all[1:] if tied and HEAD_NAME in c.tensors]
    adapters = [w for c in inputs.all[1:] if isinstance(c, AdapterCheckpoint)
                for w in c.adapter.warnings]
    return tuple(head + adapters)
