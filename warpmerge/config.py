"""The merge config: a strict schema for warp.yaml, and its loader.

Strict because a merge of a 27B model runs for a long time: a typo such as `mu_: 0.1` that a
lenient tool would silently ignore costs the user an hour and a wrong model. Every unknown key,
wrong type and out-of-range value is an error that names the key, with its line in the file.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .units import parse_size

GLOB_CHARS = re.compile(r"[*?\[]")
HF_PREFIX = "hf://"  # huggingface_hub's file-system paths
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
def repo_id(value: str, message: str) -> str:
    """A Hub repo id's shape, checked before any request is made."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise ValueError(message)
    return value


def natural_key(text: str) -> list[Any]:
    """Sort key that puts step-2 before step-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def format_eta(eta: float) -> str:
    """Folder-name form of an η value: 0.3 -> '0.3', 1.0 -> '1'."""
    return f"{eta:g}"


class _Strict(BaseModel):
    """Rejects unknown keys with a did-you-mean suggestion (pydantic's own message has none)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = sorted(f.alias or name for name, f in cls.model_fields.items())
            for key in data:
                if key not in known and key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
                    hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(
                        known
                    )
                    raise PydanticCustomError(
                        "unknown_key", "unknown key ({hint})", {"key": str(key), "hint": hint}
                    )
        return data


class HubHistory(_Strict):
    """A run pushed as one commit per save (TRL `hub_strategy="every_save"`): every commit of
    `revision` whose title matches `match` (a glob), oldest first, weights at the repo root."""

    hub_history: str
    match: str = "Training in progress*"  # the title TRL gives every push
    revision: str | None = None

    _repo_shape = field_validator("hub_history")(
        lambda v: repo_id(v, "hub_history must be a repo id like 'org/name'"))


CheckpointSpec = str | HubHistory  # one entry of `checkpoints`, before any listing


class Run(_Strict):
    """One RL run (a `policies` entry): its checkpoints, oldest first, and its SLERP weight.

    `checkpoints` is a folder, a glob over folders, an `hf://org/name[@rev]/path` (may end in a
    glob over the repo's folders), a list of those, or a `hub_history` mapping.
    """

    name: str | None = None
    checkpoints: list[str] | str | HubHistory
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME.match(v):
            raise ValueError("run names may use letters, digits, '.', '_' and '-' only")
        return v

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _hub_history(cls, v: Any) -> Any:
        """A mapping is a `hub_history`: validated here so its errors name its own keys."""
        if not isinstance(v, dict):
            return v
        try:
            return HubHistory.model_validate(v)
        except ValidationError as exc:
            text = describe_validation_error(exc, "hub_history")
            raise ValueError(text.replace("hub_history: hub_history:", "hub_history:")) from None

    @field_validator("checkpoints")
    @classmethod
    def _non_empty(cls, v: list[str] | str | HubHistory) -> list[str] | str | HubHistory:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("a run needs at least one checkpoint")
        return v


class Ema(_Strict):
    """Stage 1: the EMA of each run's checkpoints."""

    mu: float = Field(default=0.01, gt=0, le=1, allow_inf_nan=False)
    every: int | Literal["auto"] = 1  # optimizer steps between checkpoints; auto: real steps
    start: Literal["init", "first"] = "init"
    use: Literal["ema", "last"] = "ema"
    save: str | None = None

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: Any) -> Any:
        if v == "auto" or (type(v) is int and v >= 1):
            return v
        raise ValueError("every must be a number of optimizer steps (1 or more) or 'auto' "
                         "(each checkpoint's real step)")


class Slerp(_Strict):
    """Stage 2: which tensors share one SLERP angle, and the interpolation factor."""

    granularity: Literal["layer", "tensor", "model"] = "layer"
    lam: float | None = Field(default=None, alias="lambda", ge=0, le=1, allow_inf_nan=False)


class Liti(_Strict):
    """Stage 3: one output model per η."""

    eta: list[float] = Field(default_factory=lambda: [0.3])

    @field_validator("eta", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("eta")
    @classmethod
    def _finite_unique(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one eta value")
        if any(not math.isfinite(x) for x in v):
            raise ValueError("eta values must be finite numbers")
        if len({format_eta(x) for x in v}) != len(v):
            raise ValueError("eta values must be distinct")
        return v


class PushToHub(_Strict):
    repo_id: str
    private: bool = False
    revision: str | None = None

    _repo_shape = field_validator("repo_id")(
        lambda v: repo_id(v, "repo_id must look like 'user/name'"))


class Output(_Strict):
    path: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    shard_size: int = 5 * 10**9
    copy_tokenizer: bool = True
    push_to_hub: PushToHub | None = None

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        if not isinstance(v, int | str) or isinstance(v, bool):
            raise ValueError("shard_size must be a number of bytes or a string like '5GB'")
        return parse_size(v, "shard_size")


class Check(_Strict):
    prompts: list[str] | None = None
    max_new_tokens: int = Field(default=32, ge=1, le=4096)


class Front(_Strict):
    """The WARP front after the merge: every η output, the init and each run, on the
    KL–reward plane (see warpmerge.front)."""

    prompts: str
    reward_model: str | None = None
    reward: str | None = None
    samples: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
            raise ValueError("device must be cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _one_reward(self) -> Front:
        if self.reward_model is not None and self.reward is not None:
            raise PydanticCustomError("two_rewards", "give reward_model or reward, not both", {})
        return self


class WarpConfig(_Strict):
    """A whole merge. Build it from YAML with `load_config`, or directly from Python.

    Relative paths are resolved against `base_dir` (the config file's folder; the current
    directory for configs built in Python).
    """

    init: str
    runs: list[Run] = Field(alias="policies", min_length=1)  # the paper's "policies"
    ema: Ema = Field(default_factory=Ema)
    slerp: Slerp = Field(default_factory=Slerp)
    liti: Liti = Field(default_factory=Liti)
    output: Output = Field(default_factory=Output)
    check: Check | None = None
    front: Front | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _cross_checks(self) -> WarpConfig:
        names = self.run_names
        for i, name in enumerate(names):
            if name in names[:i]:
                raise PydanticCustomError(
                    "duplicate_run", "duplicate run name '{name}'", {"name": name}
                )
        if self.slerp.lam is not None and len(self.runs) != 2:
            raise PydanticCustomError(
                "lambda_runs",
                "slerp.lambda needs exactly 2 runs (got {n}); use per-run weights instead",
                {"n": len(self.runs)},
            )
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def with_base_dir(self, base_dir: Path) -> WarpConfig:
        self._base_dir = Path(base_dir).resolve()
        return self

    @property
    def run_names(self) -> list[str]:
        return [p.name or f"run-{i + 1}" for i, p in enumerate(self.runs)]

    def resolve_path(self, ref: str) -> Path:
        path = Path(ref).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    def output_dirs(self, out: Path | None = None) -> list[Path]:
        """One folder per η: the path itself for one value, <path>/eta-<value> for several."""
        root = self.output_root(out)
        if len(self.liti.eta) == 1:
            return [root]
        return [root / f"eta-{format_eta(e)}" for e in self.liti.eta]

    def output_root(self, out: Path | None = None) -> Path:
        if out is not None:
            return Path(out).resolve()
        if self.output.path is None:
            raise ConfigError("output.path: missing (set it in the config or pass --out)")
        return self.resolve_path(self.output.path).resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --- YAML loading -------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-2 as a float (YAML 1.1 insists on '1.0e-2')."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping that refuses a key given twice (PyYAML silently keeps the last one)."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _key_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path, e.g. ('policies', 1, 'weight'), to its 1-based line in the file."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            lines[sub] = key.start_mark.line + 1
            lines.update(_key_lines(value, sub))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = path + (i,)
            lines[sub] = item.start_mark.line + 1
            lines.update(_key_lines(item, sub))
    return lines


def _loc_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch markers such as 'list[str]' or 'function-before[...]'."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p != "str"))


def describe_validation_error(
    err: ValidationError, source: str, lines: dict[tuple, int] | None = None
) -> str:
    """One line for the first error: 'warp.yaml:7: ema.mu: must be ... (got 1.5)'."""
    first = err.errors()[0]
    loc = _clean_loc(first["loc"])
    ctx = first.get("ctx") or {}
    if first["type"] == "unknown_key":
        loc = loc + (ctx["key"] if ctx["key"].isprintable() else repr(ctx["key"]),)
    msg = first["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    line = None
    if lines:
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
    where = f"{source}:{line}" if line else source
    where += f": {_loc_text(loc)}" if loc else ""
    msg = " ".join(msg.split())
    got = ""
    if first["type"] not in ("unknown_key", "missing") and not isinstance(first["input"], dict):
        got = f" (got {first['input']!r})"[:200]
    return f"{where}: {msg}{got}"


def load_config(path: str | Path) -> WarpConfig:
    """Read and validate warp.yaml; any problem is a ConfigError naming file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read the config ({exc.strerror})") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}{line}: YAML syntax error: {exc.problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(f"{path.name}:{line}: YAML syntax error: control character "
                          f"{exc.character!r} is not allowed") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path.name}: YAML error: {detail}") from None
    except RecursionError:
        raise ConfigError(f"{path.name}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of keys (init, policies, ...)")
    try:
        config = WarpConfig.model_validate(data)
    except RecursionError:
        raise ConfigError(f"{path.name}: YAML nested too deeply") from None
    except ValidationError as exc:
        lines = _key_lines(node) if node is not None else {}
        raise ConfigError(describe_validation_error(exc, path.name, lines)) from None
    return config.with_base_dir(path.resolve().parent)


def build_config(**kwargs: Any) -> WarpConfig:
    """WarpConfig from Python keyword arguments, with the same one-line errors as YAML."""
    try:
        return WarpConfig.model_validate(kwargs)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "config")) from None
