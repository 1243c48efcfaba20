"""The WARP front (`warpmerge.front`): each model's KL from the init against its reward.

WARP's η trades reward for closeness to the init; choosing it needs both numbers per model.

- Samples: `samples` completions per prompt at temperature 1 (the policy itself, no top-k),
  from the KV-cached generator, seeded: one generator per model, seeded with `seed`, drawn
  prompt by prompt, so a seed gives the same samples again on the same machine and device.
- KL(π‖π_init) is estimated on π's own samples y ~ π(·|x): the sum over the completion of
  log π(y_t) − log π_init(y_t) is an unbiased estimate of the sequence-level KL. Reported as
  the mean over samples ± its standard error, and per token (Σ over samples / Σ tokens).
- Reward: a Gemma 2 reward model scores `<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n
  <start_of_turn>model\\n{completion}<end_of_turn>\\n` with its own tokenizer; or a Python
  function with TRL's reward-function signature gets the prompts, the completions and the
  prompt file's other fields by name.

Memory: one model at a time. Each π is loaded, samples and scores its own samples, and is
freed; then π_init samples too (it is the KL = 0 point) and scores every model's samples; then
the reward model. Models that cannot fit on the device are refused before anything loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .check import Progress, parse_device, target_log_probs, validate_folder
from .errors import ConfigError, InputError
from .rewards import RewardFunction, load_reward_function
from .sampling import PromptRecord, encode_prompt, read_prompt_records

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .gemma2 import Gemma2


@dataclass
class Sample:
    """One sampled completion; `logp` and `logp_init` are summed over `completion_ids`."""

    prompt: int  # index in the prompts file
    prompt_ids: list[int]
    completion_ids: list[int]  # the stop token included when one was sampled
    completion: str  # decoded, without special tokens
    logp: float = 0.0
    logp_init: float = 0.0
    reward: float | None = None


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / √n; None for n < 2)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class ModelFront:
    """One model's point on the front, with the samples every figure is computed from."""

    name: str
    path: str
    eta: float | None
    samples: list[Sample] = field(default_factory=list)

    @property
    def kl(self) -> dict[str, float | None]:
        diffs = [s.logp - s.logp_init for s in self.samples]
        mean, stderr = mean_stderr(diffs)
        tokens = sum(len(s.completion_ids) for s in self.samples)
        return {"mean": mean, "stderr": stderr,
                "per_token": math.fsum(diffs) / tokens if tokens else 0.0}

    @property
    def reward(self) -> dict[str, float | None] | None:
        rewards = [s.reward for s in self.samples]
        if not rewards or any(r is None for r in rewards):
            return None
        mean, stderr = mean_stderr([float(r) for r in rewards if r is not None])
        return {"mean": mean, "stderr": stderr}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "eta": self.eta, "kl": self.kl,
                "reward": self.reward, "samples": [asdict(s) for s in self.samples]}


@dataclass
class FrontReport:
    models: list[ModelFront]  # the init first
    init: str
    reward: str | None  # the reward model or function that scored the samples
    samples: int
    max_new_tokens: int
    seed: int
    device: str
    dtype: str
    prompts: list[Any] = field(default_factory=list)  # each record's prompt, as given

    def to_dict(self) -> dict[str, Any]:
        """The shape `warpmerge front --json` prints and front.json holds."""
        return {
            "init": self.init,
            "reward": self.reward,
            "samples_per_prompt": self.samples,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "prompts": self.prompts,
            "models": [m.to_dict() for m in self.models],
        }


# --------------------------------------------------------------------------------------------
# The front
# --------------------------------------------------------------------------------------------


def front(
    models: Sequence[str | Path],
    init: str | Path,
    prompts: str | Path | Sequence[dict[str, Any]],
    reward_model: str | Path | None = None,
    reward: str | RewardFunction | None = None,
    samples: int = 4,
    max_new_tokens: int = 128,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> FrontReport:
    """Place each model (and the init, at KL = 0) on the KL–reward plane; see the module doc.

    `prompts` is a prompts file or a list of records ({"prompt": ..., other fields}); `reward`
    a "module:function" string or the callable itself. `names` labels the models (default:
    their folder names). Every input is validated before any model is loaded.
    """
    from .gemma2 import Gemma2

    tell = progress or (lambda what, done, total: None)
    if reward_model is not None and reward is not None:
        raise ConfigError("give a reward model or a reward function, not both")
    if samples < 1 or max_new_tokens < 1:
        raise ConfigError("samples and max_new_tokens must be >= 1")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype}")
    device = parse_device(device)
    init = Path(init)
    paths = [Path(m) for m in models]
    labels = list(names) if names is not None else _unique_names(paths)
    if len(labels) != len(paths):
        raise ConfigError(f"{len(labels)} names for {len(paths)} models")
    if str(init.resolve()) not in {str(p.resolve()) for p in paths}:
        paths, labels = [init, *paths], ["init", *labels]
    init_index = next(i for i, p in enumerate(paths) if p.resolve() == init.resolve())

    # --- validate everything before loading anything -----------------------------------
    init_config = validate_folder(init)
    for p in paths:
        if validate_folder(p).vocab_size != init_config.vocab_size:
            raise InputError(f"{p}: vocab_size differs from the init's; KL needs one vocabulary")
    records = (read_prompt_records(Path(prompts)) if isinstance(prompts, str | Path)
               else _records_from_list(prompts))
    from .check import find_tokenizer

    tokenizer = find_tokenizer([init, *paths])
    if tokenizer is None:
        raise InputError(f"{init}: the front needs a tokenizer.json in the model folders")
    context = _context_length(init)
    prompt_ids = [encode_prompt(tokenizer, r) for r in records]
    for r, ids in zip(records, prompt_ids, strict=True):
        if any(i >= init_config.vocab_size for i in ids):
            raise InputError(f"{r.where}: the tokenizer produced an id >= vocab_size")
        if context is not None and len(ids) >= context:
            raise InputError(f"{r.where}: the prompt is {len(ids)} tokens, the model's context "
                             f"is {context}")
    reward_fn = _reward_function(reward, records)
    scorer = _RewardModelScorer.open(Path(reward_model)) if reward_model is not None else None
    _check_memory([*paths] + ([Path(reward_model)] if reward_model is not None else []),
                  dtype, device)

    from .gemma2 import stop_ids_for

    stop_ids = stop_ids_for(tokenizer, init_config)
    fronts = [ModelFront(label, str(p), _eta_of(p)) for label, p in zip(labels, paths,
                                                                        strict=True)]
    order = [i for i in range(len(paths)) if i != init_index] + [init_index]
    with torch.inference_mode():
        for i in order:
            tell(f"front: sampling from {labels[i]}", 0, 0)
            model = Gemma2.from_pretrained(paths[i], dtype=dtype, device=device)
            fronts[i].samples = sample_completions(
                model, prompt_ids, tokenizer, samples, max_new_tokens, seed, stop_ids, context,
                lambda done, total, name=labels[i]: tell(f"{name}: sampling", done, total))
            score_samples(model, fronts[i].samples, "logp")
            if i == init_index:
                for s in fronts[i].samples:
                    s.logp_init = s.logp  # the same forward pass: KL of the init is exactly 0
                for j, f in enumerate(fronts):
                    if j != init_index:
                        score_samples(model, f.samples, "logp_init")
                        tell("π_init on every model's samples", j + 1, len(fronts))
            del model
        if scorer is not None:
            scorer.score(fronts, records, dtype, device, tell)
        elif reward_fn is not None:
            for f in fronts:
                rewards = reward_fn(records, f.samples)
                for s, r in zip(f.samples, rewards, strict=True):
                    s.reward = r
    reward_name = (str(reward_model) if reward_model is not None
                   else reward if isinstance(reward, str)
                   else getattr(reward, "__name__", None) if reward is not None else None)
    return FrontReport(
        models=[fronts[init_index]] + [f for j, f in enumerate(fronts) if j != init_index],
        init=str(init), reward=reward_name, samples=samples, max_new_tokens=max_new_tokens,
        seed=seed, device=device, dtype=str(dtype).removeprefix("torch."),
        prompts=[r.prompt for r in records],
    )


def sample_completions(
    model: Gemma2,
    prompt_ids: list[list[int]],
    tokenizer: Tokenizer | None,
    samples: int,
    max_new_tokens: int,
    seed: int,
    stop_ids: tuple[int, ...],
    context: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """`samples` completions of each prompt at temperature 1, from one generator seeded once.

    A completion ends with the first stop id sampled (kept) or after the token budget.
    """
    from .gemma2 import decode

    generator = torch.Generator(device=model.device).manual_seed(seed)
    stops = set(stop_ids) | set(model.config.eos_token_ids)
    out: list[Sample] = []
    for p, ids in enumerate(prompt_ids):
        budget = max_new_tokens if context is None else min(max_new_tokens, context - len(ids))
        batch = torch.tensor([ids] * samples, device=model.device)
        new = model.generate(batch, budget, temperature=1.0, generator=generator,
                             stop_ids=stop_ids).tolist()
        for row in new:
            end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            completion = row[:end]
            text = decode(tokenizer, completion).strip() if tokenizer is not None else ""
            out.append(Sample(p, list(ids), completion, text))
        if progress is not None:
            progress(p + 1, len(prompt_ids))
    return out


def score_samples(model: Gemma2, samples: list[Sample], attribute: str) -> None:
    """Set each sample's `attribute` to Σ_t log model(y_t | x, y_<t) over its completion.

    The completions of one prompt go through in one right-padded batch: attention is causal,
    so the padding after a row's last token cannot change that row's log-probs.
    """
    by_prompt: dict[int, list[Sample]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt, []).append(s)
    for group in by_prompt.values():
        rows = [s.prompt_ids + s.completion_ids for s in group]
        width = max(len(r) for r in rows)
        pad = model.config.pad_token_id
        batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        logp = model.log_probs(batch).cpu()
        for s, row, lp in zip(group, rows, logp, strict=True):
            if not s.completion_ids:
                setattr(s, attribute, 0.0)
                continue
            targets = target_log_probs(lp[: len(row)], row)[len(s.prompt_ids) - 1 :]
            setattr(s, attribute, float(targets.double().sum()))


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def _reward_function(reward: str | RewardFunction | None, records: list[PromptRecord]
                     ) -> Callable[[list[PromptRecord], list[Sample]], list[float]] | None:
    if reward is None:
        return None
    fn = load_reward_function(reward) if isinstance(reward, str) else RewardFunction(reward)
    fn.check_fields(records)

    def call(recs: list[PromptRecord], samples: list[Sample]) -> list[float]:
        return fn([recs[s.prompt] for s in samples], [s.completion for s in samples],
                  [s.completion_ids for s in samples])

    return call


class _RewardModelScorer:
    """A Gemma 2 reward model and its tokenizer, scoring (prompt, completion) texts."""

    def __init__(self, folder: Path, tokenizer: Tokenizer) -> None:
        self.folder = folder
        self.tokenizer = tokenizer

    @classmethod
    def open(cls, folder: Path) -> _RewardModelScorer:
        from .gemma2 import load_tokenizer

        validate_folder(folder)
        tokenizer = load_tokenizer(folder)
        if tokenizer is None:
            raise InputError(f"{folder}: the reward model needs its tokenizer.json")
        return cls(folder, tokenizer)

    def score(self, fronts: list[ModelFront], records: list[PromptRecord], dtype: torch.dtype,
              device: str, tell: Progress) -> None:
        from .gemma2 import Gemma2RewardModel
        from .sampling import reward_text

        tell(f"loading {self.folder}", 0, 0)
        rm = Gemma2RewardModel.from_pretrained(self.folder, dtype=dtype, device=device)
        for k, f in enumerate(fronts):
            for s in f.samples:
                text = reward_text(records[s.prompt], s.completion)
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
                s.reward = float(rm(torch.tensor([ids], device=device))[0])
            tell("reward model", k + 1, len(fronts))
        del rm


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _records_from_list(items: Sequence[dict[str, Any]]) -> list[PromptRecord]:
    from .sampling import record_from

    records = [record_from(item, f"prompts[{i}]") for i, item in enumerate(items)]
    if not records:
        raise InputError("prompts: no prompts given")
    return records


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths, strict=True)]


def _eta_of(folder: Path) -> float | None:
    """η of a merged folder, from its warpmerge.json (None for any other model)."""
    try:
        eta = json.loads((folder / "warpmerge.json").read_text(encoding="utf-8")).get("eta")
    except (OSError, ValueError, AttributeError):
        return None
    return float(eta) if isinstance(eta, int | float) and not isinstance(eta, bool) else None


def _context_length(folder: Path) -> int | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ctx = value.get("max_position_embeddings") if isinstance(value, dict) else None
    return ctx if isinstance(ctx, int) and ctx > 0 else None


def _check_memory(folders: list[Path], dtype: torch.dtype, device: str) -> None:
    """Refuse a model that cannot fit where it will be loaded (one at a time, so the largest)."""
    from .sampling import parameter_count

    available = _available_bytes(device)
    if available is None:
        return
    size = torch.tensor([], dtype=dtype).element_size()
    for folder in folders:
        need = parameter_count(folder) * size
        if need > available:
            raise InputError(
                f"{folder}: needs {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} "
                f"on {device}, only {available / 1e9:.1f} GB is available"
            )


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.mem_get_info(index)[0])
    if device == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_front(report: FrontReport | dict[str, Any]) -> str:
    """The front as a terminal table, one row per model."""
    data = report.to_dict() if isinstance(report, FrontReport) else report
    models = data["models"]
    n = len(models[0]["samples"]) if models else 0
    name_w = max(8, *(len(m["name"]) for m in models)) if models else 8
    lines = [f"WARP front: {n} samples per model ({data['samples_per_prompt']} per prompt), "
             f"temperature 1, seed {data['seed']}, {data['dtype']} on {data['device']}",
             f"reward: {data['reward'] or '(none)'}", "",
             f"{'model':<{name_w}} {'η':>6} {'KL (nats)':>18} {'KL/token':>9} "
             f"{'reward':>18} {'tokens':>7}"]

    def pm(fig: dict[str, Any] | None) -> str:
        if fig is None:
            return "—"
        err = fig.get("stderr")
        return f"{fig['mean']:.4g}" + (f" ± {err:.2g}" if err is not None else "")

    for m in models:
        eta = "—" if m["eta"] is None else f"{m['eta']:g}"
        tokens = sum(len(s["completion_ids"]) for s in m["samples"]) / max(1, len(m["samples"]))
        lines.append(f"{m['name']:<{name_w}} {eta:>6} {pm(m['kl']):>18} "
                     f"{m['kl']['per_token']:>9.4f} {pm(m['reward']):>18} {tokens:>7.1f}")
    lines += ["", "KL(π‖π_init) per sequence, estimated on π's own samples: mean ± standard "
              "error.", "tokens: mean completion length."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# After a merge
# --------------------------------------------------------------------------------------------


def front_of_merge(
    outputs: Sequence[tuple[Path, float]],
    init: Path,
    runs: Sequence[tuple[str, Path]],
    root: Path,
    prompts: str | Path,
    reward_model: str | Path | None = None,
    reward: str | RewardFunction | None = None,
    samples: int = 4,
    max_new_tokens: int = 128,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    shown: Mapping[Path, str] | None = None,
) -> dict[str, Any]:
    """The front of a finished merge: its η outputs, the init and each run's model.

    Writes front.json and front.png into `root` (the parent of the eta-* folders, or the one
    output folder) and returns front.json's data. Paths in the file are folder names only
    (`shown` names a folder otherwise: a staging folder by its final name): it may be pushed
    with the model.
    """
    from .plots import plot_front

    models = [folder for folder, _ in outputs] + [path for _, path in runs]
    names = [f"eta-{eta:g}" for _, eta in outputs] + [name for name, _ in runs]
    report = front(models, init=init, prompts=prompts, reward_model=reward_model, reward=reward,
                   samples=samples, max_new_tokens=max_new_tokens, seed=seed, device=device,
                   dtype=dtype, names=names, progress=progress)
    data = report.to_dict()
    data["init"] = Path(data["init"]).name
    if isinstance(data["reward"], str) and Path(data["reward"]).is_absolute():
        data["reward"] = Path(data["reward"]).name
    etas = {str(folder): eta for folder, eta in outputs}  # known before warpmerge.json is
    for m in data["models"]:
        m["eta"] = etas.get(m["path"], m["eta"])
        m["path"] = (shown or {}).get(Path(m["path"]), Path(m["path"]).name)
    root.mkdir(parents=True, exist_ok=True)
    (root / "front.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    plot_front(data, root / "front.png")
    return data
