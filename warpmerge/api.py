"""The Python entry point: the same power as `warpmerge run`."""

from __future__ import annotations

from pathlib import Path

from .config import WarpConfig, load_config
from .engine import RunResult, execute, plan_merge


def run(
    config: str | Path | WarpConfig,
    *,
    out: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
    quiet: bool = True,
    chunk: int | None = None,
    max_memory: int | None = None,
) -> RunResult:
    """Merge as the config says; returns the output folders and per-group coefficients."""
    cfg = config if isinstance(config, WarpConfig) else load_config(config)
    plan = plan_merge(cfg, Path(out) if out is not None else None, force=force,
                      progress=not quiet, chunk=chunk, max_memory=max_memory)
    return execute(plan, quiet=quiet, threads=threads)
