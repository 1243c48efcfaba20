"""Reading a PEFT LoRA `adapter_config.json`, and resolving it per module as PEFT does.

A checkpoint saved as an adapter stands for the model PEFT's `merge_and_unload()` would give, so
every rule here is PEFT's own (version 0.21), re-expressed: which modules `target_modules`
selects, the rank and alpha `rank_pattern` / `alpha_pattern` give a module, its scaling. Options
that make the merged weights depend on something not in the checkpoint (a base modified at
initialisation, tokens trained in place, replicated layers, ...) are refused: we never guess.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"
# Keys that, when set, make PEFT build or merge something other than plain LoRA / DoRA.
UNSUPPORTED = (
    "trainable_token_indices", "layer_replication", "target_parameters", "use_qalora",
    "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
    "arrow_config", "kasa_config", "megatron_config",
)
# Initialisations that only set A and B; the others (pissa, olora, corda, loftq, lora_ga, mica)
# also rewrite the base weights, which the checkpoint does not hold.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # and True / False


@dataclass(frozen=True)
class LoraSpec:
    """The fields of an adapter config that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: str | tuple[str, ...] | None
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    modules_to_save: tuple[str, ...] | None
    fan_in_fan_out: bool
    bias: str
    lora_bias: bool
    base_model_name_or_path: str | None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """A module's (r, alpha): the first pattern key, in saved order, that matches the end of
        the module's name at a dot boundary; else the global value."""
        r = next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, module)),
                     self.lora_alpha)
        return r, alpha

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on this module (its name in the base model)."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(
                    module.endswith("." + key) for key in self.exclude_modules):
                return False
        if self.modules_to_save and any(
                re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            # all-linear was expanded to module names by PEFT before saving; if a config still
            # says it, every linear layer but the output head is selected (checked by shapes)
            if targets.lower() == ALL_LINEAR:
                return module != "lm_head"
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True  # a full name: layers_to_transform does not apply
        if not any(module.endswith("." + key) for key in targets):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        index = self._layer_index(module)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def _layer_index(self, module: str) -> int | None:
        """The first numbered path segment (the layer), after one of layers_pattern if given."""
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            found = None
            for pattern in self.layers_pattern:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if found:
                    break
        return int(found.group("idx")) if found else None

    def saves_module(self, module: str) -> bool:
        """Whether `modules_to_save` wraps this module (PEFT: a plain suffix test)."""
        return bool(self.modules_to_save) and any(
            module.endswith(m) for m in self.modules_to_save)


def _pattern_matches(key: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module) is not None


def read_lora_config(folder: Path, label: str) -> LoraSpec:
    """Parse and check `adapter_config.json`; every error names the file and the key."""
    path = folder / CONFIG_FILE
    where = f"{label}: {CONFIG_FILE}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{label}: missing file {CONFIG_FILE}") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read {CONFIG_FILE}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{where} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where} is not a JSON object")
    fields = _Fields(raw, where)
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"{where}: peft_type {peft_type!r} is not supported "
                         "(only LORA adapters, with or without DoRA, can be merged)")
    for key in UNSUPPORTED:
        if raw.get(key):
            raise InputError(f"{where}: {key} is set; warpmerge cannot merge such an adapter "
                             "exactly (LoRA and DoRA only)")
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        raise InputError(f"{where}: init_lora_weights {init!r} changes the base weights, which "
                         "the checkpoint does not hold; save it converted to plain LoRA "
                         "(path_initial_model_for_weight_conversion)")
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise InputError(f"{where}: bias must be none, all or lora_only, not {bias!r}")
    return LoraSpec(
        r=fields.integer("r", 8),
        lora_alpha=fields.number("lora_alpha", 8),
        use_rslora=fields.flag("use_rslora"),
        use_dora=fields.flag("use_dora"),
        rank_pattern=fields.pattern("rank_pattern", integer=True),
        alpha_pattern=fields.pattern("alpha_pattern", integer=False),
        target_modules=fields.names("target_modules", allow_str=True),
        exclude_modules=fields.names("exclude_modules", allow_str=True),
        layers_to_transform=fields.layers("layers_to_transform"),
        layers_pattern=_as_tuple(fields.names("layers_pattern", allow_str=True)),
        modules_to_save=_as_tuple(fields.names("modules_to_save", allow_str=False)),
        fan_in_fan_out=fields.flag("fan_in_fan_out"),
        bias=bias,
        lora_bias=fields.flag("lora_bias"),
        base_model_name_or_path=fields.text("base_model_name_or_path"),
    )


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return (value,) if isinstance(value, str) else value


class _Fields:
    """Typed access to the config's keys: a wrong type is an error naming the key."""

    def __init__(self, raw: dict, where: str) -> None:
        self.raw, self.where = raw, where

    def _bad(self, key: str, expected: str) -> InputError:
        return InputError(f"{self.where}: {key} must be {expected}, not {self.raw[key]!r}")

    def integer(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if type(value) is not int or value <= 0:
            raise self._bad(key, "a positive integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self._bad(key, "a number")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if value is None:
            return False
        if type(value) is not bool:
            raise self._bad(key, "true or false")
        return value

    def text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def pattern(self, key: str, integer: bool) -> dict:
        value = self.raw.get(key) or {}
        kinds = (int,) if integer else (int, float)
        if not isinstance(value, dict) or not all(
                type(v) in kinds and v > 0 for v in value.values()):
            raise self._bad(key, "an object of positive " + ("integers" if integer else "numbers"))
        for pattern in value:
            _check_regex(pattern, key, self.where)
        return dict(value)

    def names(self, key: str, allow_str: bool) -> str | tuple[str, ...] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str) and allow_str:
            _check_regex(value, key, self.where)
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of names" + (" or a regular expression"
                                                      if allow_str else ""))
        if key in ("modules_to_save", "layers_pattern"):
            for name in value:
                _check_regex(name, key, self.where)
        return tuple(value)

    def layers(self, key: str) -> int | tuple[int, ...] | None:
        value = self.raw.get(key)
        if value is None or type(value) is int:
            return value
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise self._bad(key, "a layer index or a list of them")
        return tuple(value)


def _check_regex(pattern: str, key: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error:
        raise InputError(f"{where}: {key} holds an invalid regular expression {pattern!r}"
                         ) from None
