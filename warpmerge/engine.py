"""Running a planned WARP merge: two passes per group, into staging folders.

Every WARP stage is linear in the inputs once a few scalars are known: the EMA weights a_{m,t}
(from the config) and each group's chain coefficients c_m (from the group's Gram matrix of task
vectors). So a merge is, per group:

  pass 1  read the group chunk by chunk, accumulate G_ij = ⟨δ_i, δ_j⟩ (and ‖θ_init‖²);
  pass 2  write θ_init + η·Σ_m c_m·δ_m for every η at once (and each run's EMA if asked).

With a single run there is no angle to find and pass 1 is skipped. When a group's task vectors
fit the memory budget, pass 1 keeps them and pass 2 reads nothing from disk. Outputs are built
in staging folders and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import Interrupted, RunError, WarpError
from .journal import NAME as JOURNAL
from .journal import Journal, fingerprint
from .kernel import GroupState
from .metadata import build_provenance, write_model_files, write_provenance
from .ops import ChainStep, chain_coefficients
from .planner import Group, Plan
from .plots import AnglesPainter, angles_png
from .probes import probe_machine
from .progress import Counter, Progress, silent
from .stream import Streamer
from .units import format_bytes
from .writer import ShardedWriter, Staging


@dataclass
class GroupResult:
    name: str
    numel: int
    coefficients: list[float]
    chain: list[ChainStep]
    gram: list[list[float]] | None = None  # ⟨δ_i, δ_j⟩ of the runs' task vectors (M > 1)

    def to_dict(self, run_names: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "numel": self.numel,
            "chain": [{"run": run_names[s.run], "run_index": s.run, "lambda": s.lam,
                       "cos_omega": s.cos_omega, "mode": s.mode} for s in self.chain],
            "coefficients": self.coefficients,
            "gram": self.gram,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupResult:
        chain = [ChainStep(s["run_index"], s["lambda"], s["cos_omega"], s["mode"])
                 for s in d["chain"]]
        return cls(d["name"], d["numel"], d["coefficients"], chain, d.get("gram"))


@dataclass
class RunResult:
    outputs: list[Path]
    ema_outputs: list[Path]
    groups: list[GroupResult]
    seconds: float
    provenance: dict[str, Any] = field(repr=False, default_factory=dict)


class _Outputs:
    """The writers of one merge: one model per η, then one per run when EMAs are saved.

    Every finished shard is recorded in the journal; shards a verified journal already
    holds are skipped.
    """

    def __init__(self, plan: Plan, roots: list[Path], journal: Journal,
                 verified: set[Path]) -> None:
        self.layout = plan.layout
        self.eta_dirs = [roots[0] / d.relative_to(plan.output_root) for d in plan.output_dirs]
        self.ema_dirs = [roots[1] / n for n in plan.run_names] if plan.ema_root else []
        self.writers = []
        for d in self.eta_dirs + self.ema_dirs:
            d.mkdir(parents=True, exist_ok=True)
            root = 0 if d in self.eta_dirs else 1

            def record(path: Path, size: int, crc: int, root: int = root) -> None:
                journal.shard_done(f"{root}/{path.relative_to(roots[root]).as_posix()}",
                                   size, crc)

            done = frozenset(i for i, name in enumerate(self.layout.names)
                             if d / name in verified)
            self.writers.append(ShardedWriter(d, self.layout, done, on_shard=record))

    def finished(self, group: Group) -> bool:
        """Whether every tensor of the group lies in shards that are already on disk."""
        return all(self.layout.shard_of[t.name] in w.done
                   for w in self.writers for t in group.tensors)


@dataclass
class _Bars:
    """A progress count per pass: bytes read for the Gram matrices, bytes written."""

    gram: Counter
    write: Counter


def _merge_group(plan: Plan, s: Streamer, group: Group, outs: _Outputs,
                 bars: _Bars) -> GroupResult:
    """Pass 1 (several runs: the Gram matrix, then the chain coefficients), then pass 2."""
    chunks = s.chunks(group)
    if plan.needs_gram:
        pass1 = s.cache(group) if plan.cached_numel(group) else GroupState()
        partials: list[list[list[float]]] = []
        for c, sums in zip(chunks, s.gram_sums(pass1, chunks), strict=True):
            partials.append(sums)
            bars.gram.update(plan.chunk_read_bytes(c))
        M = len(plan.runs)
        pairs = [(i, j) for i in range(M) for j in range(i, M)] + [(M, M)]
        total = {p: math.fsum(x for sums in partials for x in sums[k])
                 for k, p in enumerate(pairs)}
        gram = [[total[(min(i, j), max(i, j))] for j in range(M)] for i in range(M)]
        weights = [run.weight for run in plan.config.runs]
        coefs, chain = chain_coefficients(gram, weights, plan.config.slerp.lam, total[(M, M)])
        pass2 = replace(pass1, coefs=tuple(coefs))  # the cache, when kept, holds the δ_m
    else:
        coefs, chain, gram = [1.0], [], None
        pass2 = GroupState(coefs=(1.0,))
    results = s.outputs(pass2, chunks)
    for info in group.tensors:
        for w in outs.writers:
            w.begin_tensor(info.name)
        if info.is_float:
            for _ in range(0, info.numel, plan.chunk):  # its chunks' results, in order
                for w, data in zip(outs.writers, next(results), strict=True):
                    w.write(data)
                    bars.write.update(data.numel() * data.element_size())
        else:  # copied from the init, byte for byte
            for start in range(0, info.numel, plan.chunk):
                data = plan.init.read(info, start, min(plan.chunk, info.numel - start))
                for w in outs.writers:
                    w.write(data)
                    bars.write.update(data.numel() * data.element_size())
    if next(results, None) is not None:
        raise RuntimeError("more chunk results than tensors")
    for ckpt in plan.inputs.all:  # a group computed from a file that changed meanwhile is void
        ckpt.check_unchanged()
    return GroupResult(group.name, group.float_numel, list(coefs), chain, gram)


def _counters(plan: Plan, progress: Progress) -> _Bars:
    gram_bytes = sum(plan.float_read_bytes(g) for g in plan.groups) if plan.needs_gram else 0
    return _Bars(Counter(progress, "pass 1: angles (read)", gram_bytes, "B"),
                 Counter(progress, "pass 2: models (written)", plan.out_bytes, "B"))


def _check_free_space(plan: Plan) -> None:
    """Measured again now: the disks may have filled up since the plan was made."""
    machine = probe_machine([plan.output_root] + ([plan.ema_root] if plan.ema_root else []))
    for need in plan.disk_needs(machine):
        if need.missing:
            raise RunError(f"not enough free space at {need.where}: the output needs "
                           f"{format_bytes(need.needed)}, {format_bytes(need.free)} is free "
                           f"({format_bytes(need.missing)} missing)")


@dataclass(frozen=True)
class Staged:
    """The finished outputs, weights and model files written, still in their staging folders."""

    root: Path  # the staging folder of output.path
    eta_dirs: list[Path]  # one per η (the root itself for a single η)
    final_dirs: list[Path]  # the names they will take
    ema_dirs: list[Path]  # each run's EMA, with ema.save


# Figures about the finished outputs (the check, the front) to record in each η output's
# warpmerge.json and card: called before the provenance is written and the folders take their
# final names.
Annotate = Callable[[Staged], list[dict[str, Any]]]


def execute(plan: Plan, *, progress: Progress = silent, resume: bool = False,
            annotate: Annotate | None = None, painter: AnglesPainter | None = None) -> RunResult:
    """Stream the merge into staging folders and rename them into place when complete.

    With `resume`, a staging folder left by a killed run of the same merge is continued:
    its journal's shards are verified and kept, and finished groups are not recomputed.
    The provenance and card are written once, last, with what `annotate` adds. The angles
    figure is drawn by `painter` (in its own process, while the outputs are flushed to disk),
    else here.
    """
    t0 = time.perf_counter()
    _check_free_space(plan)
    stagings = [Staging(plan.output_root)] + ([Staging(plan.ema_root)] if plan.ema_root else [])
    fp = fingerprint(plan)
    prior = Journal.load(stagings[0].path / JOURNAL, fp) if resume else None
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: see stream.py
    streamer = Streamer(plan)
    results: list[GroupResult] = []
    keep = False  # a failure after the merge (check, front) keeps the staging for --resume
    try:
        roots = [st.create(keep=prior is not None) for st in stagings]
        journal = prior or Journal(roots[0] / JOURNAL)
        verified = prior.verified_shards(roots) if prior else set()
        if prior is None:
            journal.start(fp)
        outs = _Outputs(plan, roots, journal, verified)
        for c in plan.inputs.all:
            c.open_files()
        bars = _counters(plan, progress)
        out_bytes = {t.name: t.nbytes for t in plan.layout.tensors}
        for index, group in enumerate(plan.groups):
            done = journal.groups.get(index)
            if done is not None and outs.finished(group):
                for info in group.tensors:
                    for w in outs.writers:
                        w.skip_tensor(info.name)
                        bars.write.update(out_bytes[info.name])
                results.append(GroupResult.from_dict(done))
                continue
            results.append(_merge_group(plan, streamer, group, outs, bars))
            journal.group_done(index, results[-1].to_dict(plan.run_names))
        for w in outs.writers:
            w.finish()
        for d in outs.eta_dirs + outs.ema_dirs:
            write_model_files(plan, d)
        provenance = build_provenance(plan, [g.to_dict(plan.run_names) for g in results])
        groups, names = provenance["groups"], list(plan.run_names)
        if painter is not None and plan.needs_gram:
            painter.request(groups, names)
        staged = Staged(roots[0], outs.eta_dirs, list(plan.output_dirs), outs.ema_dirs)
        try:
            extras = annotate(staged) if annotate else [{} for _ in plan.etas]
        except WarpError as exc:  # the merge is done: keep it for --resume
            keep = True
            raise type(exc)(f"{exc} (the merged weights are kept: fix this and rerun with "
                            "--resume to skip the merge)") from None
        if plan.needs_gram:  # angles between runs: one figure for every output
            provenance["plots"] = {"angles": "angles.png"}
        for d, eta, extra in zip(outs.eta_dirs, plan.etas, extras, strict=True):
            write_provenance(plan, d, {**provenance, "eta": eta, **extra})
        for d, name in zip(outs.ema_dirs, plan.run_names if outs.ema_dirs else [], strict=True):
            write_provenance(plan, d, {**provenance, "eta": None, "ema_of_run": name})
        (roots[0] / JOURNAL).unlink()
        if plan.needs_gram:
            if painter is not None:
                for st in stagings:
                    st.sync()  # the bulk of the bytes, while the child draws the figure
            angles = painter.result() if painter is not None else angles_png(groups, names)
            for d in outs.eta_dirs + outs.ema_dirs:
                (d / "angles.png").write_bytes(angles)
        for st in stagings:
            st.commit()
    except BaseException as exc:
        if not keep:
            for st in stagings:
                st.discard()
        if isinstance(exc, KeyboardInterrupt | Interrupted):
            raise RunError("interrupted; the partial output was removed") from None
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise RunError(f"disk full while writing {plan.output_root} ({exc.strerror}); "
                               "the partial output was removed") from None
            raise RunError(f"I/O error while writing the output: {exc}") from None
        raise
    finally:
        streamer.close()
        torch.set_num_threads(torch_threads)
        for c in plan.inputs.all:
            c.close()
    ema_outputs = [plan.ema_root / n for n in plan.run_names] if plan.ema_root else []
    return RunResult(list(plan.output_dirs), ema_outputs, results, time.perf_counter() - t0,
                     provenance)
