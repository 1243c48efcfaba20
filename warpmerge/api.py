"""The Python entry points: the same power as the command line, returning data.

`plan` does all that `warpmerge run --dry-run` does; `run` merges, checks and pushes as the
config says. Nothing here prints: lines a user should see go to the `echo` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import WarpConfig, format_eta, load_config
from .engine import RunResult, execute
from .planner import Plan, plan_merge
from .probes import probe_machine
from .progress import Bars, Progress, silent
from .resolve import resolve_inputs

Echo = Callable[[str], None]


def plan(
    config: str | Path | WarpConfig,
    *,
    out: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
    quiet: bool = True,
    chunk: int | None = None,
    max_memory: int | None = None,
    allow_nonfinite: bool = False,
    dry_run: bool = True,
) -> Plan:
    """Open every input, check every shape, decide the merge; write nothing.

    With `dry_run` (the default) Hub weights are not downloaded: their headers are read over
    the network. `print(plan)` is the dry-run text.
    """
    cfg = config if isinstance(config, WarpConfig) else load_config(config)
    out = Path(out) if out is not None else None
    inputs = resolve_inputs(cfg, out, force=force, progress=not quiet, dry_run=dry_run)
    download_dir = None
    if any(c.download_bytes for c in inputs.all):
        from .hub import hub_cache_dir

        download_dir = hub_cache_dir()
    ema_root = [cfg.resolve_path(cfg.ema.save).resolve()] if cfg.ema.save else []
    machine = probe_machine([cfg.output_root(out), *ema_root]
                            + ([download_dir] if download_dir else []))
    return plan_merge(cfg, inputs, machine, out=out, chunk=chunk, max_memory=max_memory,
                      threads=threads, allow_nonfinite=allow_nonfinite,
                      download_dir=download_dir)


def run(
    config: str | Path | WarpConfig,
    *,
    out: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
    quiet: bool = True,
    chunk: int | None = None,
    max_memory: int | None = None,
    allow_nonfinite: bool = False,
    resume: bool = False,
    echo: Echo = lambda line: None,
    progress: Progress | None = None,
) -> RunResult:
    """Merge as the config says, then check and push when the config asks for it.

    Returns the output folders and the per-group SLERP coefficients. `echo` receives the
    lines a user should see (warnings, check tables, pushed URLs); `progress` how far each
    pass got (default: bars on stderr unless `quiet`).
    """
    if progress is None:
        progress = silent if quiet else Bars()
    merge = plan(config, out=out, force=force, threads=threads, quiet=quiet, chunk=chunk,
                 max_memory=max_memory, allow_nonfinite=allow_nonfinite, dry_run=False)
    for warning in merge.warnings:
        echo(f"warning: {warning}")
    annotate = None
    if merge.config.check is not None:
        def annotate(staged: list[Path], final: list[Path]) -> list[dict[str, Any]]:
            return _check_outputs(merge, staged, final, quiet, echo)

    result = execute(merge, progress=progress, resume=resume, annotate=annotate)
    if merge.config.output.push_to_hub is not None:
        _push_outputs(merge, result, quiet, echo)
    return result


def _check_outputs(plan: Plan, staged: list[Path], final: list[Path], quiet: bool,
                   echo: Echo) -> list[dict[str, Any]]:
    """The check report of each output against the init and each run's last checkpoint,
    for its warpmerge.json and model card."""
    from .check import check_models, format_report

    against = [plan.init.path] + [run[-1].path for run in plan.runs]
    check = plan.config.check
    extras = []
    for folder, name in zip(staged, final, strict=True):
        report = check_models(folder, against, prompts=check.prompts,
                              max_new_tokens=check.max_new_tokens, progress=not quiet)
        report.model.path = str(name)  # the folder it is about to become, not the staging
        echo(f"Check of {name.name}:\n{format_report(report)}")
        figures = report.to_dict()
        for entry in [figures["model"], *figures["against"]]:  # no local paths in files
            entry["path"] = Path(entry["path"]).name
        extras.append({"check": figures})
    return extras


def _push_outputs(plan: Plan, result: RunResult, quiet: bool, echo: Echo) -> None:
    """One η goes to the configured revision; several go to branches named eta-<value>."""
    from .hub import push_folder

    target = plan.config.output.push_to_hub
    several = len(result.outputs) > 1
    for folder, eta in zip(result.outputs, plan.etas, strict=True):
        revision = f"eta-{format_eta(eta)}" if several else target.revision
        url = push_folder(folder, target.repo_id, private=target.private, revision=revision,
                          progress=not quiet)
        echo(f"Pushed {folder} to {url}")
