"""Planning a merge: every input opened and checked, groups and output layout decided.

Nothing here reads tensor data or writes a byte, so `--dry-run` is this module plus a print,
and every validation error is raised before any output exists.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import WarpConfig, format_eta
from .errors import ConfigError
from .kernel import BLOCK, GroupState, Results, Workspace, aligned
from .ops import ema_coefficients
from .sources import (
    HEAD_NAME,
    Checkpoint,
    TensorInfo,
    check_compatible,
    locate,
    read_model_config,
)
from .writer import OutTensor, ShardedWriter

DEFAULT_CHUNK = 1 << 18  # elements per chunk: a worker's buffers stay in the CPU cache
JOB_CHUNKS = 4  # chunks per worker job: a hand-off between threads costs more than a chunk
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LAYER = re.compile(r"^(.*?layers\.\d+)\.")

@dataclass
class Group:
    """Tensors sharing one SLERP angle."""

    name: str
    tensors: list[TensorInfo]

    @property
    def float_numel(self) -> int:
        return sum(t.numel for t in self.tensors if t.is_float)

    @property
    def cache_numel(self) -> int:
        """Elements of one cached vector of the group: each tensor starts CACHE_ALIGN-aligned,
        so a chunk sits at the same memory alignment in the cache as in a work buffer (and
        vectorized reductions see the same data layout)."""
        return sum(aligned(t.numel) for t in self.tensors if t.is_float)


@dataclass
class Plan:
    """Everything decided before the first tensor byte is read."""

    config: WarpConfig
    init: Checkpoint
    runs: list[list[Checkpoint]]
    run_names: list[str]
    ema_coefs: list[list[float]]
    groups: list[Group]
    out_tensors: list[OutTensor]
    output_root: Path
    output_dirs: list[Path]
    etas: list[float]
    ema_root: Path | None
    chunk: int
    max_memory: int
    save_coefs: list[list[float]]  # the EMA weights of each run, for `ema.save`
    threads: int = 1
    allow_nonfinite: bool = False
    warnings: list[str] = field(default_factory=list)
    model_config: dict | None = None  # the init's config.json, copied with dtype updated

    @property
    def inputs(self) -> list[Checkpoint]:
        return [self.init] + [c for run in self.runs for c in run]

    @property
    def read_inputs(self) -> list[Checkpoint]:
        """The inputs whose bytes the merge reads: checkpoints with a zero weight are not."""
        used = [c for run, a in zip(self.runs, self.ema_coefs, strict=True)
                for c, w in zip(run, a, strict=True) if w != 0.0]
        return [self.init] + used

    @property
    def n_outputs(self) -> int:
        """Models written: one per η, plus one per run when EMAs are saved."""
        return len(self.etas) + (len(self.runs) if self.ema_root else 0)

    @property
    def model_bytes(self) -> int:
        """The bytes of one output model."""
        return sum(t.nbytes for t in self.out_tensors)

    @property
    def out_bytes(self) -> int:
        return self.model_bytes * self.n_outputs

    @property
    def needs_gram(self) -> bool:
        return len(self.runs) > 1

    def workspace_bytes(self) -> int:
        """The chunk buffers: each worker's scratch, and the results of the jobs in flight."""
        workspace = Workspace.nbytes(self.chunk, len(self.runs))
        results = Results.nbytes(self.chunk, self.n_outputs) * JOB_CHUNKS
        return workspace * self.threads + results * (self.threads + 1)

    def cache_bytes(self, group: Group) -> int:
        return GroupState.cache_nbytes(len(self.runs), group.cache_numel)

    def cacheable(self, group: Group) -> bool:
        """Whether pass 1 keeps the group's task vectors so that pass 2 reads nothing."""
        return self.cache_bytes(group) <= self.max_memory - self.workspace_bytes()

    def float_read_bytes(self, group: Group) -> int:
        """Bytes one pass over the group's float tensors reads from the inputs."""
        return sum(c.lookup(t.name).nbytes for t in group.tensors if t.is_float
                   for c in self.read_inputs)

    def read_bytes(self) -> int:
        """Bytes read from disk: pass 1 (when needed) plus pass 2 for uncached groups."""
        total = 0
        for g in self.groups:
            passes = 2 if self.needs_gram and not self.cacheable(g) else 1
            total += self.float_read_bytes(g) * passes
            total += sum(t.nbytes for t in g.tensors if not t.is_float)
        return total


def group_key(name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        m = LAYER.match(name)
        if m:
            return m.group(1)
    return name


def make_groups(tensors: list[TensorInfo], granularity: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for t in tensors:
        key = group_key(t.name, granularity)
        groups.setdefault(key, Group(key, [])).tensors.append(t)
    return list(groups.values())


def default_max_memory() -> int:
    """A quarter of the memory available now, between 256 MiB and 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 4 * 2**30
    return min(max(available // 4, 256 * 2**20), 2 * 2**30)


def _check_output_location(root: Path, inputs: list[Checkpoint], force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output path is an existing file: {root}")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ConfigError(f"output folder is not empty: {root} (use --force to replace it)")
    for ckpt in inputs:
        src = ckpt.path.resolve()
        if root == src or root.is_relative_to(src) or src.is_relative_to(root):
            raise ConfigError(f"output folder {root} overlaps the input {ckpt.label} ({src})")


def plan_merge(config: WarpConfig, out: Path | None = None, *, force: bool = False,
               progress: bool = True, dry_run: bool = False, chunk: int | None = None,
               max_memory: int | None = None, threads: int | None = None,
               allow_nonfinite: bool = False) -> Plan:
    """Open every input, check it against the init, and decide groups and output layout."""
    root = config.output_root(out)
    run_names = config.run_names
    init = locate(config.init, config.base_dir, "init", progress, dry_run)
    runs: list[list[Checkpoint]] = []
    for i, name in enumerate(run_names):
        refs = config.checkpoint_refs(i)
        runs.append([
            locate(ref, config.base_dir, f"{name} checkpoint {t + 1} ({Path(ref).name})",
                   progress, dry_run)
            for t, ref in enumerate(refs)
        ])
    model_config = read_model_config(init)
    names = list(init.tensors)
    inputs = [init] + [c for run in runs for c in run]
    for ckpt in inputs[1:]:
        check_compatible(init, ckpt, names)
    out_dtype = OUT_DTYPES.get(config.output.dtype) if config.output.dtype else None
    groups = make_groups(list(init.tensors.values()), config.slerp.granularity)
    out_tensors = [
        OutTensor(t.name, out_dtype if (out_dtype and t.is_float) else t.dtype, t.shape)
        for g in groups for t in g.tensors
    ]
    ema_root = config.resolve_path(config.ema.save).resolve() if config.ema.save else None
    _check_output_location(root, inputs, force)
    if ema_root is not None:
        _check_output_location(ema_root, inputs, force)
        if ema_root == root or ema_root.is_relative_to(root) or root.is_relative_to(ema_root):
            raise ConfigError(f"ema.save ({ema_root}) overlaps output.path ({root})")
    chunk = max(BLOCK, ((chunk or DEFAULT_CHUNK) // BLOCK) * BLOCK)
    if config.check is not None:
        _check_checkable(init, config)
    warnings = [f"{c.label}: has its own {HEAD_NAME}, but the init ties it to the embedding; "
                "the output stays tied and that tensor is not merged"
                for c in inputs[1:] if HEAD_NAME in c.tensors and HEAD_NAME not in init.tensors]
    ema = config.ema
    return Plan(
        config=config, init=init, runs=runs, run_names=run_names,
        ema_coefs=[ema_coefficients(len(r), ema.mu, ema.every, ema.start, ema.use) for r in runs],
        save_coefs=[ema_coefficients(len(r), ema.mu, ema.every, ema.start) for r in runs],
        groups=groups, out_tensors=out_tensors, output_root=root,
        output_dirs=config.output_dirs(out), etas=list(config.liti.eta), ema_root=ema_root,
        chunk=chunk, max_memory=max_memory or default_max_memory(),
        threads=threads or torch.get_num_threads(), allow_nonfinite=allow_nonfinite,
        warnings=warnings, model_config=model_config,
    )


def _check_checkable(init: Checkpoint, config: WarpConfig) -> None:
    """Fail before merging, not after, if the `check:` section cannot run on this model."""
    from .gemma2 import Gemma2Config

    Gemma2Config.from_folder(init.path)
    if config.check.prompts and not (init.path / "tokenizer.json").is_file():
        raise ConfigError("check.prompts needs a tokenizer.json in the init folder; "
                          "remove the prompts to check on built-in token sequences")


def human(n: float) -> str:
    """Decimal units, as disk sizes and shard sizes are given."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def describe_plan(plan: Plan) -> str:
    """The --dry-run report: inputs, groups, bytes to read and write, output shards."""
    lines = ["Inputs:"]
    for c in plan.inputs:
        size = sum(f.size for f in c.files)
        where = f"{c.repo_id}@{c.commit[:10]}" if c.repo_id and c.commit else str(c.path)
        extra = f", {human(c.download_bytes)} to download" if c.download_bytes else ""
        lines.append(f"  {c.label}: {where} ({len(c.files)} file(s), {human(size)}{extra})")
    for name, coefs in zip(plan.run_names, plan.ema_coefs, strict=True):
        lines.append(f"  {name}: EMA weights {', '.join(f'{a:.6g}' for a in coefs)}")
    g = plan.groups
    lines.append(f"Groups ({plan.config.slerp.granularity}): {len(g)} — "
                 + ", ".join(x.name for x in g[:4]) + (", ..." if len(g) > 4 else ""))
    cached = sum(1 for x in g if plan.cacheable(x)) if plan.needs_gram else len(g)
    lines.append(f"Read: {human(plan.read_bytes())} ({cached} of {len(g)} groups read once)   "
                 f"Write: {human(plan.out_bytes)}")
    lines += _space_lines(plan)
    shards = ShardedWriter(Path("."), plan.out_tensors, plan.config.output.shard_size).names
    for d, eta in zip(plan.output_dirs, plan.etas, strict=True):
        lines.append(f"Output eta={format_eta(eta)}: {d} ({len(shards)} shard(s))")
    if plan.ema_root:
        for n in plan.run_names:
            lines.append(f"EMA of {n}: {plan.ema_root / n}")
    return "\n".join(lines)


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free space on the disk that holds `path`, or would once it is created."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def disk_needs(plan: Plan) -> list[tuple[Path, int, int]]:
    """(where, free bytes, bytes to write there) for each disk the outputs go to.

    The merged models go to output.path and the saved EMAs to ema.save, which may be on
    another disk; two paths on one disk add up.
    """
    targets = [(plan.output_root, plan.model_bytes * len(plan.etas))]
    if plan.ema_root is not None:
        targets.append((plan.ema_root, plan.model_bytes * len(plan.runs)))
    disks: dict[int, tuple[Path, int, int]] = {}
    for root, nbytes in targets:
        where, free = free_bytes(root)
        disk = where.stat().st_dev
        where, free, needed = disks.get(disk, (where, free, 0))
        disks[disk] = (where, free, needed + nbytes)
    return list(disks.values())


def _space_lines(plan: Plan) -> list[str]:
    """Disk space for the dry run: downloads into the Hub cache, and the output."""
    lines = []
    download = sum(c.download_bytes for c in plan.inputs)
    if download:
        from .hub import hub_cache_dir

        where, free = free_bytes(hub_cache_dir())
        short = f", {human(download - free)} MISSING" if download > free else ""
        lines.append(f"Download: {human(download)} into {hub_cache_dir()} "
                     f"({human(free)} free{short})")
    for where, free, needed in disk_needs(plan):
        short = f", {human(needed - free)} MISSING" if needed > free else ""
        lines.append(f"Disk at {where}: {human(free)} free for {human(needed)} of "
                     f"output{short}")
    return lines
