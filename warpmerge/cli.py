"""The `warpmerge` command line: parsing, messages and exit codes, nothing else.

Heavy modules (torch, the engine) are imported inside the commands, so `--help` and
`--version` start fast and a user error costs no torch import.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__

T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="WARP merging of RL fine-tuned LLM checkpoints: EMA, SLERP of task vectors, LITI.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help, as click prints it: flags without a type column
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"warpmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["WARPMERGE_DEBUG"] = "1"


@app.command()
def run(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The merge config (YAML).")],
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="PATH", help="Output path (overrides output.path).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and print the plan only.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a non-empty output folder.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, metavar="N", help="Compute threads (default: the cores).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    chunk_size: Annotated[int | None, typer.Option(
        "--chunk-size", min=1, metavar="N",
        help="Elements per streamed chunk (rounded to 65536).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", metavar="SIZE",
        help="Memory budget, e.g. 4GB (default: a quarter of free RAM, at most 2GiB).")] = None,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Merge even if an input holds NaN or Inf.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a killed run of this merge, keeping its verified shards.")]
    = False,
) -> None:
    """Merge as CONFIG says: EMA per run, SLERP across runs, LITI per eta."""
    from .api import plan as plan_merge
    from .api import run as run_merge
    from .config import load_config
    from .errors import ConfigError
    from .units import parse_size

    _imports_done()
    cfg = load_config(config)
    budget = None
    if max_memory is not None:
        try:
            budget = parse_size(max_memory, "--max-memory")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if dry_run:
        plan = plan_merge(cfg, out=out, force=force, quiet=quiet, chunk=chunk_size,
                          max_memory=budget, threads=threads)
        for warning in plan.warnings:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(str(plan))
        typer.echo("Dry run: nothing written.")
        return
    with _bars(quiet) as bars:
        result = run_merge(cfg, out=out, force=force, threads=threads, quiet=quiet,
                           chunk=chunk_size, max_memory=budget, allow_nonfinite=allow_nonfinite,
                           resume=resume, progress=bars,
                           echo=bars.echo if bars else lambda line: typer.echo(line, err=True))
    for path in result.outputs + result.ema_outputs:
        typer.echo(str(path))
    if not quiet:
        typer.echo(f"Merged in {result.seconds:.1f} s.", err=True)


@app.command()
def check(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The model folder to check.")],
    against: Annotated[list[str] | None, typer.Option(
        "--against", help="Compare with this model (repeatable).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(
        "--device", help="cpu, cuda, cuda:N or mps.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
    = False,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="A text file, one prompt per line (needs a tokenizer).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=0)] = 32,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """NLL of MODEL, and KL and top-1 agreement against each --against model."""
    import json

    from .check import check_models, format_report, read_prompts
    from .resolve import model_folder

    _imports_done()
    torch_dtype = _flag("--dtype", _parse_dtype, dtype)
    device = _flag("--device", _parse_device, device)
    prompt_list = read_prompts(prompts) if prompts is not None else None

    def local(ref: str) -> Path:  # a Hub repo id is downloaded (only what a model needs)
        return model_folder(ref, Path.cwd(), progress=not quiet)

    with _bars(quiet) as bars:
        report = check_models(local(model), [local(a) for a in against or []], dtype=torch_dtype,
                              prompts=prompt_list, max_new_tokens=max_new_tokens,
                              progress=bars, device=device)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(format_report(report))


@app.command()
def front(
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL ...", help="The models to place on the front (folders or Hub repos).")],
    init: Annotated[str, typer.Option("--init", help="θ_init: the KL = 0 point.")],
    prompts: Annotated[Path, typer.Option(
        "--prompts", help="JSON Lines (or a JSON/YAML list) of records with a 'prompt'.")],
    reward_model: Annotated[str | None, typer.Option(
        "--reward-model", help="A Gemma 2 reward model (folder or Hub repo).")] = None,
    reward: Annotated[str | None, typer.Option(
        "--reward", help="A reward function, package.module:function (TRL's form).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1,
                                         help="Completions per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
    = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the KL-reward plot here.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """KL from the init and mean reward of each MODEL, on sampled completions: the WARP front."""
    import json

    from .kl_reward import format_front
    from .kl_reward import front as run_front
    from .resolve import model_folder

    _imports_done()
    torch_dtype = _flag("--dtype", _parse_dtype, dtype)
    device = _flag("--device", _parse_device, device)
    if reward_model is not None and reward is not None:
        raise _usage("give --reward-model or --reward, not both")

    def local(ref: str) -> Path:
        return model_folder(ref, Path.cwd(), progress=not quiet)

    with _bars(quiet) as bars:
        report = run_front([local(m) for m in models], init=local(init), prompts=prompts,
                           reward_model=local(reward_model) if reward_model else None,
                           reward=reward, samples=samples, max_new_tokens=max_new_tokens,
                           seed=seed, device=device, dtype=torch_dtype, progress=bars)
    if plot is not None:
        from .plots import plot_front

        plot_front(report.to_dict(), plot)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(format_front(report))
        if plot is not None:
            typer.echo(f"Plot: {plot}")


def _parse_dtype(name: str) -> object:
    from .check import parse_dtype

    return parse_dtype(name)


def _parse_device(name: str) -> str:
    from .check import parse_device

    return parse_device(name)


def _flag(flag: str, parse: Callable[[str], T], value: str) -> T:
    """A library parser's ConfigError, reworded to name the command-line flag."""
    from .errors import ConfigError

    try:
        return parse(value)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _usage(message: str) -> Exception:
    from .errors import ConfigError

    return ConfigError(message)


@contextmanager
def _bars(quiet: bool) -> Iterator[Any]:
    """Progress bars on stderr for a library call (None when quiet), closed afterwards."""
    from .progress import Bars

    bars = None if quiet else Bars()
    try:
        yield bars
    finally:
        if bars is not None:
            bars.close()


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A merged model folder.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="user/name on the Hub.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(
        "--revision", metavar="BRANCH", help="Branch to push to.")] = None,
    message: Annotated[str | None, typer.Option(
        "--message", metavar="TEXT", help="Commit message.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Upload FOLDER to the Hub in one commit; stale shards in the repo are deleted."""
    from .errors import InputError
    from .hub import push_folder

    _imports_done()
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"no safetensors weights in {folder}")
    typer.echo(push_folder(folder, repo_id, private=private, revision=revision, message=message,
                           progress=not quiet))


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Where to build the demo.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Build a small synthetic WARP setup, merge it, check it and say what happened."""
    from .demo import run_demo

    _imports_done()
    run_demo(out, quiet=quiet)


def _imports_done() -> None:
    """The garbage collector back on, once a command has imported torch: see entry()."""
    if not gc.isenabled():
        gc.freeze()  # the modules live as long as the process: never scan them again
        gc.enable()


def _interrupt(signum: int, frame: object) -> None:
    from .errors import Interrupted

    raise Interrupted


def main() -> None:
    """The command line: one line on stderr and the contract's exit code for our errors.

    Tests call this in-process; the installed command and `python -m warpmerge` call entry().
    """
    from .errors import WarpError

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    debug = os.environ.get("WARPMERGE_DEBUG") == "1" or "--debug" in sys.argv
    click_error = typer.BadParameter.__mro__[2]  # ClickException, from typer's own click
    try:
        code = app(standalone_mode=False)
    except WarpError as exc:
        if debug:
            raise
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(exc.exit_code)
    except click_error as exc:  # usage errors: one line too, with where to get help
        message = " ".join(exc.format_message().split())
        if message:  # empty after `warpmerge` alone has printed the help
            known = {c.name or c.callback.__name__ for c in app.registered_commands}
            command = next((a for a in sys.argv[1:] if a in known), "")
            hint = f"see 'warpmerge {command + ' ' if command else ''}--help'"
            typer.echo(f"error: {message} ({hint})", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The process's entry point: main(), with a faster start and a faster end.

    The start: the garbage collector is off until the command's imports are done (they make
    only long-lived objects). The end skips the interpreter's teardown.

    Tearing down torch's modules takes about 0.6 s, as long as merging a small model. By the
    time main() returns every output file is closed and renamed into place; what is left to do
    is flushing streams and the atexit handlers, which this does. Exceptions (--debug) and
    profilers or coverage tools, which report at teardown, get the ordinary exit.
    """
    import atexit

    gc.disable()  # importing torch makes ~1M objects, and collecting during it costs 0.25 s
    # numpy's OpenBLAS starts a thread per core on import, which spins for a while (0.1 s of
    # CPU here); no command does linear algebra in numpy. A user's own setting is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            code = code or 1
    os._exit(code)
