"""The Python entry points: the same power as the command line, returning data.

`plan` does all that `warpmerge run --dry-run` does; `run` merges, then checks, traces the
front and pushes as the config says. Nothing here prints: lines a user should see go to the
`echo` callback, progress to the `progress` one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import WarpConfig, format_eta, load_config
from .plots import AnglesPainter
from .progress import Bars, Progress, silent

if TYPE_CHECKING:  # imported where used: torch comes with them, after the painter has started
    from .engine import RunResult, Staged
    from .planner import Plan

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
    from .planner import plan_merge
    from .probes import probe_machine
    from .resolve import resolve_inputs

    cfg = config if isinstance(config, WarpConfig) else load_config(config)
    if cfg.front is not None:
        _validate_front(cfg)
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
    """Merge as the config says, then check, trace the front and push when it asks for it.

    Returns the output folders and the per-group SLERP coefficients. `echo` receives the
    lines a user should see (warnings, check and front tables, pushed URLs); `progress` how
    far each step got (default: bars on stderr unless `quiet`). The check's and the front's
    figures are in each output's warpmerge.json and card, written once, before the outputs
    take their final names.
    """
    if progress is None:
        progress = silent if quiet else Bars()
    cfg = config if isinstance(config, WarpConfig) else load_config(config)
    painter = _painter() if len(cfg.runs) > 1 else None
    try:
        return _run(cfg, painter, out=out, force=force, threads=threads, quiet=quiet,
                    chunk=chunk, max_memory=max_memory, allow_nonfinite=allow_nonfinite,
                    resume=resume, echo=echo, progress=progress)
    finally:
        if painter is not None:
            painter.close()


_painter_started = False  # one painter child per process (see _painter)


def _painter() -> AnglesPainter | None:
    """angles.png drawn by a child that imports matplotlib while the merge runs, for the first
    merge of a process that has not imported matplotlib. Later merges of the same process (a
    notebook's) draw here: a child per merge would import matplotlib every time (0.6 s), where
    this process imports it once."""
    global _painter_started
    if _painter_started or "matplotlib.figure" in sys.modules:
        return None
    _painter_started = True
    return AnglesPainter()


def _run(cfg: WarpConfig, painter: AnglesPainter | None, *, out: str | Path | None,
         force: bool, threads: int | None, quiet: bool, chunk: int | None,
         max_memory: int | None, allow_nonfinite: bool, resume: bool, echo: Echo,
         progress: Progress) -> RunResult:
    from .engine import execute

    merge = plan(cfg, out=out, force=force, threads=threads, quiet=quiet, chunk=chunk,
                 max_memory=max_memory, allow_nonfinite=allow_nonfinite, dry_run=False)
    for warning in merge.warnings:
        echo(f"warning: {warning}")
    if merge.config.front is not None:  # front.png is drawn here
        _import_plotting_meanwhile()

    def annotate(staged: Staged) -> list[dict[str, Any]]:
        extras: list[dict[str, Any]] = [{} for _ in merge.etas]
        if merge.config.check is not None:
            for extra, figures in zip(extras, _check_outputs(merge, staged, progress, echo),
                                      strict=True):
                extra["check"] = figures
        if merge.config.front is not None:
            for extra, front in zip(extras, _front_outputs(merge, staged, progress, echo),
                                    strict=True):
                extra["front"] = front
        return extras

    result = execute(merge, progress=progress, resume=resume, annotate=annotate,
                     painter=painter)
    if merge.config.output.push_to_hub is not None:
        _push_outputs(merge, result, quiet, echo)
    return result


def _check_outputs(plan: Plan, staged: Staged, progress: Progress,
                   echo: Echo) -> list[dict[str, Any]]:
    """The check report of each output against the init and each run's last checkpoint."""
    from .adapters import AdapterCheckpoint
    from .check import check_models, format_report

    emas = staged.ema_dirs or [None] * len(plan.runs)
    against = [plan.init.path] + [  # each run's saved EMA, else its last full checkpoint
        ema if ema is not None else run[-1].path
        for run, ema in zip(plan.runs, emas, strict=True)
        if ema is not None or not isinstance(run[-1], AdapterCheckpoint)]
    check = plan.config.check
    figures = []
    for folder, final in zip(staged.eta_dirs, staged.final_dirs, strict=True):
        def renamed(task: str, done: int, total: int, unit: str = "",
                    folder: Path = folder, final: Path = final) -> None:
            progress(task.replace(str(folder), str(final)), done, total, unit)

        report = check_models(folder, against, prompts=check.prompts,
                              max_new_tokens=check.max_new_tokens, progress=renamed)
        report.model.path = str(final)  # the folder it is about to become, not the staging
        echo(f"Check of {final.name}:\n{format_report(report)}")
        data = report.to_dict()
        for entry in [data["model"], *data["against"]]:  # no local paths in files
            entry["path"] = Path(entry["path"]).name
        figures.append(data)
    return figures


def _validate_front(cfg: WarpConfig) -> None:
    """The front's prompts and reward function, checked before anything is written."""
    from .rewards import load_reward_function
    from .sampling import read_prompt_records

    records = read_prompt_records(cfg.resolve_path(cfg.front.prompts))
    if cfg.front.reward is not None:
        load_reward_function(cfg.front.reward).check_fields(records)


def _import_plotting_meanwhile() -> None:
    """matplotlib imported on a side thread while the merge runs (the merge's work is in
    torch, outside the GIL): the plots then cost their drawing only."""
    import threading

    from .plots import import_matplotlib

    threading.Thread(target=import_matplotlib, daemon=True).start()


def _front_outputs(plan: Plan, staged: Staged, progress: Progress,
                   echo: Echo) -> list[dict[str, Any]]:
    """The WARP front of the η outputs, the init and each run (its saved EMA, else its last
    checkpoint): front.json and front.png in the output root; each η output gets the plot and
    its own row."""
    import shutil

    import torch

    from .adapters import AdapterCheckpoint
    from .kl_reward import format_front, front_of_merge
    from .resolve import model_folder

    settings = plan.config.front
    runs = []
    emas = staged.ema_dirs or [None] * len(plan.runs)
    for name, run, ema in zip(plan.run_names, plan.runs, emas, strict=True):
        if ema is None and isinstance(run[-1], AdapterCheckpoint):
            echo(f"front: {name} left out (its last checkpoint is an adapter; set ema.save "
                 "to place the run on the front)")
            continue
        runs.append((f"{name} ({'EMA' if ema is not None else 'last'})",
                     ema if ema is not None else run[-1].path))
    reward_model = (model_folder(settings.reward_model, plan.config.base_dir)
                    if settings.reward_model else None)
    data = front_of_merge(
        list(zip(staged.eta_dirs, plan.etas, strict=True)), plan.init.path, runs, staged.root,
        plan.config.resolve_path(settings.prompts), reward_model=reward_model,
        reward=settings.reward, samples=settings.samples, max_new_tokens=settings.max_new_tokens,
        seed=settings.seed, device=settings.device,
        dtype=torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32,
        progress=progress, shown={d: f.name for d, f in zip(staged.eta_dirs, staged.final_dirs,
                                                           strict=True)})
    rows = []
    for folder, eta in zip(staged.eta_dirs, plan.etas, strict=True):
        if folder != staged.root:
            shutil.copyfile(staged.root / "front.png", folder / "front.png")
        row = next(m for m in data["models"] if m["eta"] == eta)
        rows.append({"plot": "front.png", "reward": data["reward"],
                     "model": {k: v for k, v in row.items() if k != "samples"}})
    echo(format_front(data))
    return rows


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
