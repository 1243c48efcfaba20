"""Reward functions in TRL's form: `fn(prompts, completions, **fields) -> list[float]`.

So that a GRPO user scores the front with the very function they trained with, it is called
as TRL calls it: `prompts` (strings, or message lists for chat prompts), `completions` (strings,
or `[{"role": "assistant", "content": ...}]` for chat prompts), `completion_ids`, and each of
the prompt file's other fields as a list, by name. Anything wrong with what it returns is a
one-line InputError naming the function.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from .errors import InputError
from .sampling import PromptRecord

TRL_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                 "log_metric"}


class RewardFunction:
    """A reward callable with the checks around it."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        try:
            self.params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            self.params = {}  # a builtin: pass everything and let it say

    @property
    def takes_any(self) -> bool:
        return not self.params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in self.params.values())

    def needed_fields(self) -> list[str]:
        """Fields it names without a default: every record must have them."""
        return [name for name, p in self.params.items()
                if name not in TRL_ARGUMENTS and p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               inspect.Parameter.KEYWORD_ONLY)]

    def check_fields(self, records: list[PromptRecord]) -> None:
        for name in self.needed_fields():
            for r in records:
                if name not in r.fields:
                    raise InputError(f"{r.where}: no '{name}' field, which reward function "
                                     f"{self.name} needs")

    def __call__(self, records: list[PromptRecord], completions: list[str],
                 completion_ids: list[list[int]]) -> list[float]:
        chat = isinstance(records[0].prompt, list) if records else False
        kwargs: dict[str, Any] = {
            "prompts": [r.prompt for r in records],
            "completions": ([[{"role": "assistant", "content": c}] for c in completions]
                            if chat else list(completions)),
            "completion_ids": completion_ids,
        }
        names = {k for r in records for k in r.fields}
        kwargs.update({k: [r.fields.get(k) for r in records] for k in sorted(names)})
        if not self.takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self.params}
        try:
            values = self.fn(**kwargs)
        except Exception as err:  # the user's code: any failure is theirs to see in one line
            raise InputError(f"reward function {self.name} raised "
                             f"{type(err).__name__}: {err}") from None
        return self._checked(values, len(completions))

    def _checked(self, values: Any, n: int) -> list[float]:
        try:
            values = list(values)
        except TypeError:
            raise InputError(f"reward function {self.name} returned {type(values).__name__}, "
                             "not a list of numbers") from None
        if len(values) != n:
            raise InputError(f"reward function {self.name} returned {len(values)} values for "
                             f"{n} completions")
        out = []
        for v in values:
            if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
                v = v.item()
            if (isinstance(v, bool) or not isinstance(v, numbers.Real)
                    or not math.isfinite(float(v))):
                raise InputError(f"reward function {self.name} returned {v!r}, not a finite "
                                 "number")
            out.append(float(v))
        return out


def load_reward_function(spec: str) -> RewardFunction:
    """'package.module:function' -> the function, imported (the current folder on the path)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"reward function {spec!r}: expected 'package.module:function'")
    import sys
    from pathlib import Path

    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise InputError(f"reward function {spec}: cannot import {module_name} "
                         f"({type(err).__name__}: {err})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InputError(f"reward function {spec}: {module_name} has no {attr}")
    if not callable(fn):
        raise InputError(f"reward function {spec}: {attr} is not callable")
    return RewardFunction(fn, spec)
