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
    if cfg.front is not None:
        _validate_front(cfg)
    plan = plan_merge(cfg, Path(out) if out is not None else None, force=force,
                      progress=not quiet, chunk=chunk, max_memory=max_memory, threads=threads,
                      allow_nonfinite=allow_nonfinite)
    for warning in plan.warnings:
        echo(f"warning: {warning}")
    _import_plotting_meanwhile()
    result = execute(plan, quiet=quiet, resume=resume)
    if cfg.check is not None:
        _check_outputs(plan, result, quiet, echo)
    if cfg.front is not None:
        _front_outputs(plan, result, quiet, echo)
    if cfg.output.push_to_hub is not None:
        _push_outputs(plan, result, quiet, echo)
    return result


def _check_outputs(plan: Plan, result: RunResult, quiet: bool,
                   echo: Callable[[str], None]) -> None:
    """The check report of each output against the init and each run's last checkpoint;
    its figures go into warpmerge.json and the model card."""
    from .check import check_models, format_report

    against = [plan.init.path] + [run[-1].path for run in plan.runs]
    check = plan.config.check
    for folder in result.outputs:
        report = check_models(folder, against, prompts=check.prompts,
                              max_new_tokens=check.max_new_tokens,
                              progress=None if quiet else _loading_lines(echo))
        figures = report.to_dict()
        for entry in [figures["model"], *figures["against"]]:  # no local paths in files
            entry["path"] = Path(entry["path"]).name
        _update_provenance(plan, folder, check=figures)
        echo(f"Check of {folder.name}:\n{format_report(report)}")


def _validate_front(cfg: WarpConfig) -> None:
    """The front's prompts and reward function, checked before anything is written."""
    from .rewards import load_reward_function
    from .sampling import read_prompt_records

    records = read_prompt_records(cfg.resolve_path(cfg.front.prompts))
    if cfg.front.reward is not None:
        load_reward_function(cfg.front.reward).check_fields(records)


def _import_plotting_meanwhile() -> None:
    """matplotlib imported on a side thread while the merge runs (the merge's work is in
    torch, outside the GIL): angles.png then costs its drawing only."""
    import threading

    from .plots import import_matplotlib

    threading.Thread(target=import_matplotlib, daemon=True).start()


def _front_outputs(plan: Plan, result: RunResult, quiet: bool,
                   echo: Callable[[str], None]) -> dict:
    """The WARP front of the η outputs, the init and each run (its saved EMA, else its last
    checkpoint): front.json and front.png in the output root; each η's card shows the plot
    and its own row."""
    import shutil

    import torch

    from .kl_reward import format_front, front_of_merge
    from .sources import model_folder

    settings = plan.config.front
    base = plan.config.base_dir
    runs = []
    for name, run, ema in zip(plan.run_names, plan.runs,
                              result.ema_outputs or [None] * len(plan.runs), strict=True):
        path = ema if ema is not None else run[-1].path
        if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            runs.append((f"{name} ({'EMA' if ema is not None else 'last'})", path))
        else:
            echo(f"front: {name} left out (its last checkpoint is an adapter; set ema.save "
                 "to place the run on the front)")
    reward_model = (model_folder(settings.reward_model, base, progress=not quiet)
                    if settings.reward_model else None)
    data = front_of_merge(
        list(zip(result.outputs, plan.etas, strict=True)), plan.init.path, runs,
        plan.output_root, plan.config.resolve_path(settings.prompts), reward_model=reward_model,
        reward=settings.reward, samples=settings.samples, max_new_tokens=settings.max_new_tokens,
        seed=settings.seed, device=settings.device,
        dtype=torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32,
        progress=None if quiet else _loading_lines(echo))
    for folder, eta in zip(result.outputs, plan.etas, strict=True):
        if folder != plan.output_root:
            shutil.copyfile(plan.output_root / "front.png", folder / "front.png")
        row = next(m for m in data["models"] if m["eta"] == eta)
        row = {k: v for k, v in row.items() if k != "samples"}
        _update_provenance(plan, folder, front={"plot": "front.png", "model": row,
                                                "reward": data["reward"]})
    echo(format_front(data))
    return data


def _update_provenance(plan: Plan, folder: Path, **entries: object) -> None:
    """Add entries to a finished output's warpmerge.json and re-render its card."""
    import json

    from .metadata import read_license, write_provenance

    provenance = json.loads((folder / "warpmerge.json").read_text(encoding="utf-8"))
    provenance.update(entries)
    write_provenance(folder, provenance, read_license(plan.init.path))


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
