"""Resolving a merge's inputs: every model named by the config found, opened and checked.

All the I/O before planning happens here: local folders and globs, Hub downloads (or, in a dry
run, remote headers), safetensors headers, the byte comparison of non-float tensors, the
init's config.json, and the state of the output folders. What comes out (`Inputs`) is data the
planner decides from without touching a disk.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import AdapterCheckpoint, is_adapter, open_adapter
from .config import GLOB_CHARS, HF_PREFIX, CheckpointSpec, HubHistory, WarpConfig, natural_key
from .errors import ConfigError, InputError
from .modelfolder import (
    DTYPE_CODES,
    HEAD_NAME,
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_model_config,
)
from .steps import run_steps

if TYPE_CHECKING:
    from . import hub


Input = Checkpoint | AdapterCheckpoint  # a model the merge reads: full weights, or an adapter


@dataclass(frozen=True)
class Inputs:
    """The opened models of one merge: headers and provenance, no tensor data."""

    init: Checkpoint
    runs: list[list[Input]]  # each run's checkpoints, oldest first
    steps: list[list[int]]  # each checkpoint's step as the EMA counts it (real with every: auto)
    model_config: dict | None  # the init's config.json
    license: str | None  # the init's license (its card's metadata), for the output's card

    @property
    def all(self) -> list[Input]:
        return [self.init] + [c for run in self.runs for c in run]

    def close(self) -> None:
        for c in self.all:
            c.close()


def resolve_inputs(config: WarpConfig, out: Path | None = None, *, force: bool = False,
                   progress: bool = True, dry_run: bool = False) -> Inputs:
    """Open the init and every checkpoint, check each against the init, and check that the
    output folders may be written. Raises before anything is written."""
    root = config.output_root(out)  # a missing output.path is reported before any download
    from .hub import checkpoint_name, expand_checkpoints, read_license

    init = locate(config.init, config.base_dir, "init", progress, dry_run)
    runs: list[list[Input]] = []
    steps: list[list[int]] = []
    for i, name in enumerate(config.run_names):
        refs = expand_checkpoints(checkpoint_refs(config, i))
        runs.append([
            locate(ref, config.base_dir, f"{name} checkpoint {t + 1} ({checkpoint_name(ref)})",
                   progress, dry_run, init=init, init_ref=config.init)
            for t, ref in enumerate(refs)
        ])
        steps.append(run_steps(runs[-1], refs, config.ema.every))
    inputs = Inputs(init, runs, steps, read_model_config(init), read_license(init.path))
    names = list(init.tensors)
    for ckpt in inputs.all[1:]:
        if isinstance(ckpt, Checkpoint):  # an adapter was checked against the init on opening
            check_compatible(init, ckpt, names)
    check_output_location(root, inputs.all, force)
    if config.ema.save:
        ema_root = config.resolve_path(config.ema.save).resolve()
        check_output_location(ema_root, inputs.all, force)
        if ema_root == root or ema_root.is_relative_to(root) or root.is_relative_to(ema_root):
            raise ConfigError(f"ema.save ({ema_root}) overlaps output.path ({root})")
    if config.check is not None:
        _check_checkable(init, config)
    return inputs


def check_output_location(root: Path, inputs: list[Checkpoint], force: bool) -> None:
    """An output folder must be new or empty (or --force), and apart from every input."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output path is an existing file: {root}")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ConfigError(f"output folder is not empty: {root} (use --force to replace it)")
    for ckpt in inputs:
        src = ckpt.path.resolve()
        if root == src or root.is_relative_to(src) or src.is_relative_to(root):
            raise ConfigError(f"output folder {root} overlaps the input {ckpt.label} ({src})")


def _check_checkable(init: Checkpoint, config: WarpConfig) -> None:
    """Fail before merging, not after, if the `check:` section cannot run on this model."""
    from .gemma2 import Gemma2Config

    Gemma2Config.from_folder(init.path)
    if config.check.prompts and not (init.path / "tokenizer.json").is_file():
        raise ConfigError("check.prompts needs a tokenizer.json in the init folder; "
                          "remove the prompts to check on built-in token sequences")


def _local_path(ref: str, base_dir: Path) -> Path | None:
    """The folder a ref names if it is local: it exists, or is path-like ('./x', '/x', '~/x'),
    or its first folder exists here. None means: try it as a Hub repo id."""
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else base_dir / local
    first = ref.split("/", 1)[0]
    if (local.exists() or ref.startswith((".", "/", "~")) or "\\" in ref
            or (base_dir / first).is_dir()):
        return local
    return None


def _hub_ref(ref: str, label: str) -> tuple[str, str | None]:
    from . import hub

    parsed = hub.parse_repo_ref(ref)
    if parsed is None:
        raise InputError(f"{label}: folder not found: {ref}")
    return parsed


def model_folder(ref: str, base_dir: Path, progress: bool = True) -> Path:
    """The local folder of a model named by a path or a Hub repo id (downloaded if needed)."""
    from . import hub

    if ref.startswith(hub.HF_PREFIX):
        return hub.fetch_checkpoint(hub.hub_model(ref), model_files=True, progress=progress).path
    local = _local_path(ref, base_dir)
    if local is not None:
        return local
    return hub.fetch_model(*_hub_ref(ref, ref), progress=progress).path


def locate(ref: str | hub.HubCheckpoint, base_dir: Path, label: str, progress: bool = True,
           dry_run: bool = False, init: Checkpoint | None = None,
           init_ref: str | None = None) -> Input:
    """Open a model named by a local path, a Hub repo id or `hf://` path, or a resolved Hub
    checkpoint; a local folder of a repo id's name wins. A folder holding a PEFT adapter is
    opened as one on top of `init`."""
    from . import hub

    if isinstance(ref, str) and ref.startswith(hub.HF_PREFIX):
        ref = hub.hub_model(ref)
    if isinstance(ref, hub.HubCheckpoint):
        model = hub.fetch_checkpoint(ref, model_files=label == "init", progress=progress,
                                     dry_run=dry_run)
        shown = ref.ref
    else:
        local = _local_path(ref, base_dir)
        if local is not None:
            if is_adapter(local):
                return _open_adapter(local, label, ref, init, init_ref, trust_links=False)
            return open_checkpoint(local, label, ref)
        model = hub.fetch_model(*_hub_ref(ref, label), progress=progress, dry_run=dry_run)
        shown = ref
    if is_adapter(model.path):
        ckpt = _open_adapter(model.path, label, shown, init, init_ref, trust_links=True)
    else:
        remote = hub.remote_weight_headers(model) if dry_run else None
        ckpt = open_checkpoint(model.path, label, shown, trust_links=True, remote=remote)
    ckpt.repo_id, ckpt.revision, ckpt.commit = model.repo_id, model.revision, model.commit
    ckpt.download_bytes = model.download_bytes
    return ckpt


def _open_adapter(folder: Path, label: str, ref: str, init: Checkpoint | None,
                  init_ref: str | None, trust_links: bool) -> AdapterCheckpoint:
    if init is None:
        raise InputError(f"{label}: {ref} holds a PEFT adapter, not a full model (the init "
                         "must be the adapter's base model)")
    adapter = open_adapter(folder, label, init.tensors, init_ref, trust_links=trust_links)
    return AdapterCheckpoint(label, ref, folder, adapter)


def checkpoint_refs(config: WarpConfig, index: int) -> list[CheckpointSpec]:
    """The checkpoints of run `index`: local globs expanded and naturally sorted.

    Hub entries (`hf://...`, `hub_history`) come back as written: listing a repo is the Hub's
    I/O, done by `warpmerge.hub.expand_checkpoints`.
    """
    spec = config.runs[index].checkpoints
    refs = [spec] if isinstance(spec, str | HubHistory) else list(spec)
    out: list[CheckpointSpec] = []
    for ref in refs:
        if isinstance(ref, str) and GLOB_CHARS.search(ref) and not ref.startswith(HF_PREFIX):
            pattern = str(config.resolve_path(ref))
            found = (m for m in glob.glob(pattern) if Path(m).is_dir())
            matches = sorted(found, key=natural_key)
            if not matches:
                raise ConfigError(
                    f"{config.run_names[index]}: checkpoint glob '{ref}' matches no folder")
            out.extend(matches)
        else:
            out.append(ref)
    return out


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Byte equality of two tensors (true when a file is not downloaded: a Hub dry run)."""
    if not (a.file.exists() and b.file.exists()):
        return True
    step = 1 << 22
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        for start in range(0, a.nbytes, step):
            n = min(step, a.nbytes - start)
            fa.seek(a.offset + start)
            fb.seek(b.offset + start)
            if fa.read(n) != fb.read(n):
                return False
    return True


def check_compatible(init: Checkpoint, other: Checkpoint, names: list[str]) -> None:
    """Same tensor names, shapes and kinds as the init; report the first mismatch."""
    for name in names:
        a, b = init.tensors[name], other.lookup(name)
        if b is None:
            raise InputError(f"{other.label}: missing tensor {name} (present in the init)")
        if a.shape != b.shape:
            raise InputError(f"{other.label}: tensor {name} has shape {list(b.shape)}, "
                             f"the init has {list(a.shape)}")
        if a.is_float != b.is_float or (not a.is_float and a.dtype != b.dtype):
            raise InputError(f"{other.label}: tensor {name} has dtype {DTYPE_CODES[b.dtype]}, "
                             f"the init has {DTYPE_CODES[a.dtype]}")
        if not a.is_float and not _same_bytes(a, b):
            raise InputError(f"{other.label}: non-float tensor {name} differs from the init's "
                             "(integer and boolean tensors are copied, never merged)")
    extra = [n for n in other.tensors if n not in init.tensors and n != HEAD_NAME]
    if extra:
        raise InputError(f"{other.label}: unexpected tensor {extra[0]} (absent from the init)")
