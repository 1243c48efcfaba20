"""The dry-run text: what `print(plan)` shows, a rendering of the plan and nothing else.

Inputs, what each checkpoint contributes, groups, bytes to read and write, disk space, output
shards. Kept apart from the planning logic so that changing a line of text never touches a
decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import format_eta
from .units import format_bytes

if TYPE_CHECKING:  # the plan renders itself through this module (Plan.__str__)
    from .planner import Plan


def describe_plan(plan: Plan) -> str:
    lines = ["Inputs:"]
    for c in plan.inputs.all:
        size = sum(f.size for f in c.files)
        where = f"{c.repo_id}@{c.commit[:10]}" if c.repo_id and c.commit else str(c.path)
        extra = (f", {format_bytes(c.download_bytes)} to download" if c.download_bytes
                 else "")
        lines.append(f"  {c.label}: {where} ({len(c.files)} file(s), "
                     f"{format_bytes(size)}{extra})")
    for name, run, merged, ema, steps in zip(plan.run_names, plan.runs, plan.contributions,
                                             plan.ema_weights, plan.inputs.steps, strict=True):
        weights = ", ".join(f"{a:.6g}" for a in ema)
        if merged == ema:
            lines.append(f"  {name}: EMA weights {weights}")
        else:  # use: last
            lines.append(f"  {name}: merges its last checkpoint (use: last); its EMA's weights "
                         f"{weights}")
        lines += [f"    {c.label}: step {s}, EMA weight {a:.6g}"
                  for c, s, a in zip(run, steps, ema, strict=True)]
    g = plan.groups
    lines.append(f"Groups ({plan.config.slerp.granularity}): {len(g)} — "
                 + ", ".join(x.name for x in g[:4]) + (", ..." if len(g) > 4 else ""))
    cached = sum(1 for x in g if plan.cacheable(x)) if plan.needs_gram else len(g)
    partly = sum(1 for x in g if 0 < plan.cached_numel(x) < x.cache_numel)
    lines.append(f"Read: {format_bytes(plan.read_bytes())} ({cached} of {len(g)} groups read "
                 f"once" + (f", {partly} partly" if partly else "")
                 + f")   Write: {format_bytes(plan.out_bytes)}")
    lines += _space_lines(plan)
    shards = len(plan.layout.shards)
    for d, eta in zip(plan.output_dirs, plan.etas, strict=True):
        lines.append(f"Output eta={format_eta(eta)}: {d} ({shards} shard(s))")
    if plan.ema_root:
        for n in plan.run_names:
            lines.append(f"EMA of {n}: {plan.ema_root / n}")
    return "\n".join(lines)


def _space_lines(plan: Plan) -> list[str]:
    """Disk space: downloads into the Hub cache, and the output."""
    lines = []
    download = sum(c.download_bytes for c in plan.inputs.all)
    if download and plan.download_dir is not None:
        free = plan.machine.free_at(plan.download_dir).free
        short = f", {format_bytes(download - free)} MISSING" if download > free else ""
        lines.append(f"Download: {format_bytes(download)} into {plan.download_dir} "
                     f"({format_bytes(free)} free{short})")
    for need in plan.disk_needs():
        short = f", {format_bytes(need.missing)} MISSING" if need.missing else ""
        lines.append(f"Disk at {need.where}: {format_bytes(need.free)} free for "
                     f"{format_bytes(need.needed)} of output{short}")
    return lines
