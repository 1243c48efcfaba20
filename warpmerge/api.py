"""The Python entry point: the same power as `warpmerge run`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import WarpConfig, format_eta, load_config
from .engine import RunResult, execute
from .plan import Plan, plan_merge


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
    echo: Callable[[str], None] = lambda line: None,
) -> RunResult:
    """Merge as the config says, then check and push when the config asks for it.

    Returns the output folders and the per-group SLERP coefficients. `echo` receives the
    lines a user should see (check tables, pushed URLs).
    """
    cfg = config if isinstance(config, WarpConfig) else load_config(config)
    plan = plan_merge(cfg, Path(out) if out is not None else None, force=force,
                      progress=not quiet, chunk=chunk, max_memory=max_memory, threads=threads,
                      allow_nonfinite=allow_nonfinite)
    for warning in plan.warnings:
        echo(f"warning: {warning}")
    result = execute(plan, quiet=quiet, resume=resume)
    if cfg.check is not None:
        _check_outputs(plan, result, quiet, echo)
    if cfg.output.push_to_hub is not None:
        _push_outputs(plan, result, quiet, echo)
    return result


def _check_outputs(plan: Plan, result: RunResult, quiet: bool,
                   echo: Callable[[str], None]) -> None:
    """The check report of each output against the init and each run's last checkpoint;
    its figures go into warpmerge.json and the model card."""
    from .check import check_models, format_report
    from .metadata import read_license, write_provenance

    against = [plan.init.path] + [run[-1].path for run in plan.runs]
    check = plan.config.check
    for folder, eta in zip(result.outputs, plan.etas, strict=True):
        report = check_models(folder, against, prompts=check.prompts,
                              max_new_tokens=check.max_new_tokens,
                              progress=None if quiet else _loading_lines(echo))
        figures = report.to_dict()
        for entry in [figures["model"], *figures["against"]]:  # no local paths in files
            entry["path"] = Path(entry["path"]).name
        provenance = {**result.provenance, "eta": eta, "check": figures}
        write_provenance(folder, provenance, read_license(plan.init.path))
        echo(f"Check of {folder.name}:\n{format_report(report)}")


def _loading_lines(echo: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """A library progress callback that tells only the steps without a count (model loads)."""
    def tell(what: str, done: int, total: int) -> None:
        if total == 0:
            echo(what)
    return tell


def _push_outputs(plan: Plan, result: RunResult, quiet: bool,
                  echo: Callable[[str], None]) -> None:
    """One η goes to the configured revision; several go to branches named eta-<value>."""
    from .hub import push_folder

    target = plan.config.output.push_to_hub
    several = len(result.outputs) > 1
    for folder, eta in zip(result.outputs, plan.etas, strict=True):
        revision = f"eta-{format_eta(eta)}" if several else target.revision
        url = push_folder(folder, target.repo_id, private=target.private, revision=revision,
                          progress=not quiet)
        echo(f"Pushed {folder} to {url}")
