"""The optimizer step of each checkpoint, for `ema.every: auto`.

RL trainers save checkpoints that are not evenly spaced (a resumed run, `save_total_limit`
deleting old ones), and the EMA must use the real gaps. A checkpoint's step is, in order of
trust: `global_step` in its `trainer_state.json`, else the last number in its folder name
(`checkpoint-500`), else the last number in the title of the Hub commit it came from
("Training in progress, step 500"). The parsing is pure; only `checkpoint_step` reads a file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError

TRAINER_STATE = "trainer_state.json"
_NUMBER = re.compile(r"\d+")


def parse_trainer_state(text: str, where: str) -> int:
    """`global_step` of a trainer_state.json's text: an int ≥ 1, else an InputError naming it."""
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError(f"{where}: {TRAINER_STATE} is not valid JSON") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if type(step) is not int or step < 1:
        raise InputError(f"{where}: {TRAINER_STATE} has no global_step of 1 or more "
                         f"(got {step!r})")
    return step


def last_number(text: str | None) -> int | None:
    """The last run of digits in `text` ('checkpoint-500' -> 500), if any, and if ≥ 1."""
    found = _NUMBER.findall(text or "")
    return int(found[-1]) if found and int(found[-1]) >= 1 else None


def checkpoint_step(folder: Path, name: str | None, title: str | None, where: str) -> int | None:
    """The step of the checkpoint in `folder`; None when nothing gives one.

    `name` is the checkpoint's folder name as the user sees it (None when it has none, as for a
    commit of a Hub history, whose local folder is named after the commit hash), `title` the
    Hub commit title it came from.
    """
    state = folder / TRAINER_STATE
    if state.is_file():
        try:
            text = state.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise InputError(f"{where}: cannot read {TRAINER_STATE}") from None
        return parse_trainer_state(text, where)
    return last_number(name) if last_number(name) is not None else last_number(title)


def check_steps(steps: Sequence[int | None], labels: Sequence[str]) -> list[int]:
    """The steps, if every checkpoint has one and they strictly increase; else an InputError
    naming the first checkpoint at fault."""
    out: list[int] = []
    for step, label in zip(steps, labels, strict=True):
        if step is None:
            raise InputError(f"{label}: no step for ema.every: auto (no {TRAINER_STATE}, and no "
                             "number in its folder name or commit title); give ema.every a "
                             "number instead")
        if out and step <= out[-1]:
            raise InputError(f"{label}: step {step} does not follow step {out[-1]} of the "
                             "checkpoint before it (steps must increase in the listed order)")
        out.append(step)
    return out


def step_names(ref: Any) -> tuple[str, str | None]:
    """(name, commit title) a checkpoint's step may be read from: a local folder's name, or a
    Hub checkpoint's folder name (None at a repo's root) and commit title."""
    if isinstance(ref, str):
        return Path(ref).name, None
    return ref.name, ref.title


def run_steps(checkpoints: Sequence[Any], refs: Sequence[Any], every: int | str) -> list[int]:
    """The step of each checkpoint of a run as the EMA counts it: with `every: auto` the real
    steps (checked), else t·every. `checkpoints` are opened (`.path`, `.label`), `refs` what
    they were opened from (a local path, or a `hub.HubCheckpoint`)."""
    if every != "auto":
        return [t * int(every) for t in range(1, len(checkpoints) + 1)]
    found = [checkpoint_step(c.path, *step_names(ref), c.label)
             for c, ref in zip(checkpoints, refs, strict=True)]
    return check_steps(found, [c.label for c in checkpoints])
