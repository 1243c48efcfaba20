"""Planning and streaming a WARP merge.

Every WARP stage is linear in the inputs once a few scalars are known: the EMA weights a_{m,t}
(from the config) and each group's chain coefficients c_m (from the group's Gram matrix of task
vectors). So a merge is, per group:

  pass 1  read the group chunk by chunk, accumulate G_ij = ⟨δ_i, δ_j⟩ in float64;
  pass 2  read it again and write θ_init + η·Σ_m c_m·δ_m for every η at once.

Only chunk-sized float32 buffers are ever allocated, and they are reused. When a group's task
vectors fit the memory budget, pass 1 keeps them and pass 2 reads nothing from disk. Sums are
taken over fixed-size blocks and combined exactly (math.fsum), so no thread count or chunk size
changes a single bit of the output.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import WarpConfig, format_eta
from .errors import ConfigError, InputError, RunError
from .ops import ChainStep, chain_coefficients, ema_coefficients
from .sources import HEAD_NAME, Checkpoint, TensorInfo, check_compatible, locate
from .writer import OutTensor, ShardedWriter, Staging

BLOCK = 1 << 16  # elements per partial sum: fixed, so the summation order never changes
DEFAULT_CHUNK = 1 << 22  # elements per chunk (16 MiB per float32 buffer)
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LAYER = re.compile(r"^(.*?layers\.\d+)\.")
MODEL_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class Group:
    """Tensors sharing one SLERP angle."""

    name: str
    tensors: list[TensorInfo]

    @property
    def float_numel(self) -> int:
        return sum(t.numel for t in self.tensors if t.is_float)


@dataclass
class GroupResult:
    name: str
    numel: int
    coefficients: list[float]
    chain: list[ChainStep]

    def to_dict(self, run_names: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "numel": self.numel,
            "chain": [
                {"run": run_names[s.run], "lambda": s.lam, "cos_omega": s.cos_omega,
                 "mode": s.mode}
                for s in self.chain
            ],
            "coefficients": self.coefficients,
        }


@dataclass
class Plan:
    """Everything decided before the first byte is read: inputs, groups, outputs."""

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

    @property
    def inputs(self) -> list[Checkpoint]:
        return [self.init] + [c for run in self.runs for c in run]

    @property
    def out_bytes(self) -> int:
        per_model = sum(t.nbytes for t in self.out_tensors)
        return per_model * (len(self.etas) + (len(self.runs) if self.ema_root else 0))

    def needs_gram(self) -> bool:
        return len(self.runs) > 1

    def cacheable(self, group: Group) -> bool:
        """Whether pass 1 may keep the group's task vectors so that pass 2 reads nothing."""
        return (len(self.runs) + 1) * 4 * group.float_numel <= self.max_memory // 2

    def read_bytes(self) -> int:
        """Bytes read from disk: pass 1 (when needed) plus pass 2 for uncached groups."""
        total = 0
        for g in self.groups:
            per = sum(_input_bytes(self, t) for t in g.tensors)
            passes = 1 if (not self.needs_gram() or self.cacheable(g)) else 2
            total += per * passes
        return total


@dataclass
class RunResult:
    outputs: list[Path]
    ema_outputs: list[Path]
    groups: list[GroupResult]
    seconds: float
    provenance: dict[str, Any] = field(repr=False, default_factory=dict)


def _input_bytes(plan: Plan, t: TensorInfo) -> int:
    if not t.is_float:
        return t.nbytes
    return sum(c.lookup(t.name).nbytes for c in plan.inputs)


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
    """A safe share of the memory available now: a quarter, at least 256 MiB."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 4 * 2**30
    return max(available // 4, 256 * 2**20)


def _check_output_location(config: WarpConfig, root: Path, inputs: list[Checkpoint],
                           force: bool) -> None:
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
               max_memory: int | None = None) -> Plan:
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
    names = [n for n in init.tensors]
    for ckpt in (c for run in runs for c in run):
        check_compatible(init, ckpt, names)
    out_dtype = OUT_DTYPES.get(config.output.dtype) if config.output.dtype else None
    groups = make_groups(list(init.tensors.values()), config.slerp.granularity)
    out_tensors = [
        OutTensor(t.name, out_dtype if (out_dtype and t.is_float) else t.dtype, t.shape)
        for g in groups for t in g.tensors
    ]
    ema_root = config.resolve_path(config.ema.save).resolve() if config.ema.save else None
    inputs = [init] + [c for run in runs for c in run]
    _check_output_location(config, root, inputs, force)
    if ema_root is not None:
        _check_output_location(config, ema_root, inputs, force)
        if ema_root == root or ema_root.is_relative_to(root) or root.is_relative_to(ema_root):
            raise ConfigError(f"ema.save ({ema_root}) overlaps output.path ({root})")
    chunk = chunk or DEFAULT_CHUNK
    chunk = max(BLOCK, (chunk // BLOCK) * BLOCK)
    return Plan(
        config=config, init=init, runs=runs, run_names=run_names,
        ema_coefs=[ema_coefficients(len(r), config.ema.mu, config.ema.every, config.ema.start,
                                    config.ema.use) for r in runs],
        groups=groups, out_tensors=out_tensors, output_root=root,
        output_dirs=config.output_dirs(out), etas=list(config.liti.eta), ema_root=ema_root,
        chunk=chunk, max_memory=max_memory or default_max_memory(),
    )


# --- streaming ------------------------------------------------------------------------------

class _Buffers:
    """The reusable work buffers of one merge: a few chunk-sized arrays, allocated once."""

    def __init__(self, plan: Plan) -> None:
        n, M = plan.chunk, len(plan.runs)
        self.raw = bytearray(n * 8)
        self.x0 = torch.empty(n, dtype=torch.float32)
        self.tmp = torch.empty(n, dtype=torch.float32)
        self.acc = torch.empty(n, dtype=torch.float32)
        self.deltas = torch.empty((M, n), dtype=torch.float32)
        self.d64 = torch.empty((M, n), dtype=torch.float64) if M > 1 else None
        self.p64 = torch.empty(n, dtype=torch.float64) if M > 1 else None
        self.out: dict[torch.dtype, torch.Tensor] = {}

    def out_buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self.out.get(dtype)
        if buf is None:
            buf = self.out[dtype] = torch.empty(self.x0.numel(), dtype=dtype)
        return buf[:n]


class _Streamer:
    """Computes task-vector chunks from the inputs; the arithmetic lives here, once."""

    def __init__(self, plan: Plan, bufs: _Buffers, bar: Any) -> None:
        self.plan, self.bufs, self.bar = plan, bufs, bar

    def chunks(self, info: TensorInfo) -> Iterator[tuple[int, int]]:
        step = self.plan.chunk
        for start in range(0, info.numel, step):
            yield start, min(step, info.numel - start)

    def read(self, ckpt: Checkpoint, name: str, start: int, count: int,
             out: torch.Tensor) -> torch.Tensor:
        info = ckpt.lookup(name)
        out.copy_(ckpt.read_into(info, start, count, self.bufs.raw))
        self.bar.update(count * info.dtype.itemsize)
        return out

    def task_vectors(self, name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_init and δ_m = Σ_t a_{m,t}·(θ_{m,t} − θ_init) for one chunk, in float32.

        Differences first: a tensor a run never changed gives an exactly zero δ_m. Only plain
        elementwise ops (no fused multiply-add), so the result never depends on chunking.
        """
        b = self.bufs
        x0 = self.read(self.plan.init, name, start, count, b.x0[:count])
        deltas = b.deltas[:, :count]
        tmp = b.tmp[:count]
        for m, (run, coefs) in enumerate(zip(self.plan.runs, self.plan.ema_coefs, strict=True)):
            d = deltas[m]
            first = True
            for ckpt, a in zip(run, coefs, strict=True):
                if a == 0.0:
                    continue
                target = d if first else tmp
                self.read(ckpt, name, start, count, target)
                target.sub_(x0)
                if a != 1.0:
                    target.mul_(a)
                if not first:
                    d.add_(tmp)
                first = False
        return x0, deltas


def _block_sums(x: torch.Tensor) -> np.ndarray:
    """Float64 sums over fixed blocks of BLOCK elements (the last may be shorter)."""
    n = x.numel()
    full = (n // BLOCK) * BLOCK
    parts = [x[:full].view(-1, BLOCK).sum(dim=1).numpy()] if full else []
    if full < n:
        parts.append(x[full:].sum().reshape(1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def _gram_pass(plan: Plan, s: _Streamer, group: Group,
               cache: list | None) -> tuple[list[list[float]], float]:
    """Pass 1: the group's Gram matrix of task vectors and ‖θ_init‖², exactly summed."""
    M = len(plan.runs)
    b = s.bufs
    partials: dict[tuple[int, int], list[np.ndarray]] = {
        (i, j): [] for i in range(M) for j in range(i, M)
    }
    partials[(-1, -1)] = []
    for info in group.tensors:
        if not info.is_float:
            continue
        for start, count in s.chunks(info):
            x0, deltas = s.task_vectors(info.name, start, count)
            d64, p64 = b.d64[:, :count], b.p64[:count]
            d64.copy_(deltas)
            for i, j in partials:
                if i < 0:
                    p64.copy_(x0)
                    p64.mul_(p64)
                else:
                    torch.mul(d64[i], d64[j], out=p64)
                partials[(i, j)].append(_block_sums(p64).copy())
            if cache is not None:
                cache.append((x0.clone(), deltas.clone()))
    sums = {k: math.fsum(np.concatenate(v)) if v else 0.0 for k, v in partials.items()}
    gram = [[sums[(min(i, j), max(i, j))] for j in range(M)] for i in range(M)]
    return gram, sums[(-1, -1)]


class _Outputs:
    """The writers of one merge: one model per η, plus each run's EMA when asked."""

    def __init__(self, plan: Plan, staging_root: Path, ema_staging: Path | None) -> None:
        max_shard = plan.config.output.shard_size
        rel = [d.relative_to(plan.output_root) for d in plan.output_dirs]
        self.eta_dirs = [staging_root / r for r in rel]
        self.ema_dirs = [ema_staging / n for n in plan.run_names] if ema_staging else []
        for d in self.eta_dirs + self.ema_dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.eta_writers = [ShardedWriter(d, plan.out_tensors, max_shard) for d in self.eta_dirs]
        self.ema_writers = [ShardedWriter(d, plan.out_tensors, max_shard) for d in self.ema_dirs]

    @property
    def all(self) -> list[ShardedWriter]:
        return self.eta_writers + self.ema_writers


def _write_pass(plan: Plan, s: _Streamer, group: Group, coefs: list[float],
                outs: _Outputs, cache: list | None) -> None:
    """Pass 2: θ_init + η·Σ c_m δ_m for each η (and θ_init + δ_m for each saved EMA)."""
    b = s.bufs
    dtypes = {t.name: t.dtype for t in plan.out_tensors}
    cached = iter(cache) if cache is not None else None
    for info in group.tensors:
        for w in outs.all:
            w.begin_tensor(info.name)
        if not info.is_float:  # copied from the init, byte for byte
            for start, count in s.chunks(info):
                data = plan.init.read_into(info, start, count, b.raw)
                s.bar.update(count * info.dtype.itemsize)
                for w in outs.all:
                    w.write(data)
            continue
        out_dtype = dtypes[info.name]
        for start, count in s.chunks(info):
            if cached is not None:
                x0, deltas = next(cached)
            else:
                x0, deltas = s.task_vectors(info.name, start, count)
            merged, tmp = b.acc[:count], b.tmp[:count]
            merged.copy_(deltas[0])
            if coefs[0] != 1.0:
                merged.mul_(coefs[0])
            for m in range(1, len(coefs)):
                torch.mul(deltas[m], coefs[m], out=tmp)
                merged.add_(tmp)
            for eta, w in zip(plan.etas, outs.eta_writers, strict=True):
                torch.mul(merged, eta, out=tmp)
                tmp.add_(x0)
                w.write(_cast(tmp, out_dtype, b))
            for m, w in enumerate(outs.ema_writers):
                torch.add(x0, deltas[m], out=tmp)
                w.write(_cast(tmp, out_dtype, b))


def _cast(x: torch.Tensor, dtype: torch.dtype, b: _Buffers) -> torch.Tensor:
    if dtype == torch.float32:
        return x
    out = b.out_buffer(dtype, x.numel())
    out.copy_(x)
    return out


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=quiet, dynamic_ncols=True, leave=False)


def execute(plan: Plan, *, quiet: bool = False, threads: int | None = None) -> RunResult:
    """Stream the merge into staging folders and rename them into place when complete."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    needed = plan.out_bytes
    free = shutil.disk_usage(_existing_parent(plan.output_root)).free
    if needed > free:
        raise RunError(f"not enough free space at {plan.output_root.parent}: need "
                       f"{_human(needed)}, have {_human(free)} ({_human(needed - free)} missing)")
    staging = Staging(plan.output_root)
    ema_staging = Staging(plan.ema_root) if plan.ema_root else None
    stagings = [staging] + ([ema_staging] if ema_staging else [])
    results: list[GroupResult] = []
    try:
        root = staging.create()
        ema_root = ema_staging.create() if ema_staging else None
        outs = _Outputs(plan, root, ema_root)
        bufs = _Buffers(plan)
        with _progress(plan.read_bytes(), "merging", quiet) as bar:
            streamer = _Streamer(plan, bufs, bar)
            for group in plan.groups:
                results.append(_merge_group(plan, streamer, group, outs))
        for w in outs.all:
            w.finish()
        provenance = build_provenance(plan, results)
        for d, eta in zip(outs.eta_dirs, plan.etas, strict=True):
            _write_metadata(plan, d, {**provenance, "eta": eta})
        for d, name in zip(outs.ema_dirs, plan.run_names if outs.ema_dirs else [], strict=True):
            _write_metadata(plan, d, {**provenance, "eta": None, "ema_of_run": name})
        for st in stagings:
            st.commit()
    except BaseException as exc:
        for st in stagings:
            st.discard()
        if isinstance(exc, OSError):
            raise RunError(f"I/O error while writing the output: {exc}") from exc
        raise
    finally:
        for c in plan.inputs:
            c.close()
    ema_outputs = [plan.ema_root / n for n in plan.run_names] if plan.ema_root else []
    return RunResult(plan.output_dirs, ema_outputs, results, time.perf_counter() - t0, provenance)


def _merge_group(plan: Plan, s: _Streamer, group: Group, outs: _Outputs) -> GroupResult:
    M = len(plan.runs)
    cache = None
    if M > 1:
        cache = [] if plan.cacheable(group) else None
        gram, init_sq = _gram_pass(plan, s, group, cache)
        weights = [p.weight for p in plan.config.policies]
        coefs, steps = chain_coefficients(gram, weights, plan.config.slerp.lam, init_sq)
    else:
        coefs, steps = [1.0], []
    _write_pass(plan, s, group, coefs, outs, cache)
    return GroupResult(group.name, group.float_numel, coefs, steps)


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# --- metadata -----------------------------------------------------------------------------

def build_provenance(plan: Plan, groups: list[GroupResult]) -> dict[str, Any]:
    """What warpmerge.json records: enough to reproduce the merge and compare the result."""
    inputs = []
    for c in plan.inputs:
        role = "init" if c is plan.init else "checkpoint"
        run = None
        for name, run_ckpts in zip(plan.run_names, plan.runs, strict=True):
            if any(c is r for r in run_ckpts):
                run = name
        inputs.append({
            "role": role, "run": run, "ref": c.ref, "repo_id": c.repo_id,
            "revision": c.revision, "commit": c.commit,
            "files": [{"name": f.name, "size": f.size, "header_sha256": f.header_sha256}
                      for f in c.files],
        })
    return {
        "warpmerge_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": plan.config.to_dict(),
        "inputs": inputs,
        "runs": [
            {"name": n, "weight": p.weight, "checkpoints": len(r), "ema_coefficients": a}
            for n, p, r, a in zip(plan.run_names, plan.config.policies, plan.runs,
                                  plan.ema_coefs, strict=True)
        ],
        "groups": [g.to_dict(plan.run_names) for g in groups],
        "check": None,
    }


def _write_metadata(plan: Plan, folder: Path, provenance: dict[str, Any]) -> None:
    """config.json (dtype updated), tokenizer and generation files, warpmerge.json, card."""
    src = plan.init.path
    config_path = src / "config.json"
    if config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text())
        except ValueError:
            raise InputError(f"init: config.json is not valid JSON ({src})") from None
        if plan.config.output.dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = plan.config.output.dtype
        if HEAD_NAME not in plan.init.tensors and "tie_word_embeddings" in cfg:
            cfg["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if plan.config.output.copy_tokenizer:
        for name in MODEL_FILES:
            f = src / name
            if f.is_file():
                shutil.copyfile(f, folder / name)
    (folder / "warpmerge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (folder / "README.md").write_text(_card(plan, provenance))


def _card(plan: Plan, provenance: dict[str, Any]) -> str:
    from .card import render_card

    license_ = None
    try:
        from .hub import read_license

        license_ = read_license(plan.init.path)
    except ImportError:
        pass
    return render_card(provenance, license=license_)


def describe_plan(plan: Plan) -> str:
    """The --dry-run report: inputs, groups, bytes to read and write, output shards."""
    lines = ["Inputs:"]
    for c in plan.inputs:
        size = sum(f.size for f in c.files)
        where = f"{c.repo_id}@{c.commit[:10]}" if c.repo_id and c.commit else str(c.path)
        extra = f", {_human(c.download_bytes)} to download" if c.download_bytes else ""
        lines.append(f"  {c.label}: {where} ({len(c.files)} file(s), {_human(size)}{extra})")
    for name, coefs in zip(plan.run_names, plan.ema_coefs, strict=True):
        lines.append(f"  {name}: EMA weights {', '.join(f'{a:.6g}' for a in coefs)}")
    g = plan.groups
    lines.append(f"Groups ({plan.config.slerp.granularity}): {len(g)} — "
                 + ", ".join(x.name for x in g[:4]) + (", ..." if len(g) > 4 else ""))
    lines.append(f"Read: {_human(plan.read_bytes())}   Write: {_human(plan.out_bytes)}")
    shards = ShardedWriter(Path("."), plan.out_tensors, plan.config.output.shard_size).names
    for d, eta in zip(plan.output_dirs, plan.etas, strict=True):
        lines.append(f"Output eta={format_eta(eta)}: {d} ({len(shards)} shard(s))")
    if plan.ema_root:
        for n in plan.run_names:
            lines.append(f"EMA of {n}: {plan.ema_root / n}")
    return "\n".join(lines)
