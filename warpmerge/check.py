"""`warpmerge check`: how far a (merged) Gemma 2 moved, measured with the bundled forward pass.

For the model under test and each `--against` model (typically the init, θ_init), this runs
both on the same check tokens and reports, per position:

- NLL: mean next-token negative log-likelihood of each model on the check tokens (nats);
- KL: mean KL divergence between the two next-token distributions, in both directions;
- top-1 agreement: how often both models' most likely next token is the same;
- with prompts and a tokenizer: each model's greedy continuation of each prompt.

Memory: models are loaded one at a time. The model under test goes first; its log-probs at
every check position are kept in a temporary memory-mapped float32 file (positions x vocab x 4
bytes: 0.5 GB for 8 x 64 tokens at Gemma's vocab of 256000, 0.7 MB at a toy vocab of 320), so
RAM holds one model plus one sequence's log-probs at a time while the OS pages the file as it
needs. Each `--against` model is then loaded, compared sequence by sequence, and freed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError, InputError
from .gemma2 import (
    Gemma2,
    Gemma2Config,
    decode,
    encode_instruction,
    load_tokenizer,
    stop_ids_for,
)
from .modelfolder import FLOAT_DTYPES

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHECK_SEQUENCES = 8  # built-in check set: this many sequences ...
CHECK_LENGTH = 64  # ... of this many tokens, <bos> first
CHECK_SEED = 0
FIRST_ORDINARY_ID = 4  # ids 0-3 are <pad>, <eos>, <bos>, <unk> in the Gemma vocabulary

# the dtypes a check computes in, with their short names
DTYPES = {"float32": FLOAT_DTYPES["float32"], "fp32": FLOAT_DTYPES["float32"],
          "bfloat16": FLOAT_DTYPES["bfloat16"], "bf16": FLOAT_DTYPES["bfloat16"]}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class ModelCheck:
    """What the check measured for one model.

    `kl`, `kl_reverse` and `top1_agreement` compare this model with the model under test and are
    None for the model under test itself.
    """

    path: str
    nll: float  # mean next-token NLL on the check tokens, nats per token
    kl: float | None = None  # KL(this || model under test), nats per position
    kl_reverse: float | None = None  # KL(model under test || this), nats per position
    top1_agreement: float | None = None  # share of positions with the same argmax
    continuations: list[str] | None = None  # greedy continuation of each prompt


@dataclass
class CheckReport:
    model: ModelCheck
    against: list[ModelCheck]
    dtype: str
    source: str  # "builtin" (seeded random token ids) or "prompts" (rendered instructions)
    num_sequences: int
    num_positions: int  # positions compared (KL, agreement): every position of every sequence
    num_targets: int  # next tokens scored (NLL): every position that has a next token
    prompts: list[str] | None = None
    max_new_tokens: int = 0
    sequence_lengths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; the shape `warpmerge check --json` prints."""
        return {
            "dtype": self.dtype,
            "check_tokens": {
                "source": self.source,
                "sequences": self.num_sequences,
                "sequence_lengths": list(self.sequence_lengths),
                "positions": self.num_positions,
                "targets": self.num_targets,
            },
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens if self.prompts else None,
            "model": asdict(self.model),
            "against": [asdict(a) for a in self.against],
        }


# --------------------------------------------------------------------------------------------
# Check tokens
# --------------------------------------------------------------------------------------------


def builtin_sequences(
    vocab_size: int,
    bos_id: int = 2,
    count: int = CHECK_SEQUENCES,
    length: int = CHECK_LENGTH,
    seed: int = CHECK_SEED,
) -> list[list[int]]:
    """The fixed check set: seeded uniform token ids after <bos>, identical on every machine.

    Random ids carry no meaning, so NLL on them is only comparable between models; but every
    position still yields a full next-token distribution, which is what KL and agreement need,
    and no tokenizer or data set is required.
    """
    low = FIRST_ORDINARY_ID if vocab_size > FIRST_ORDINARY_ID else 0
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (count, length), generator=gen)
    ids[:, 0] = bos_id
    return ids.tolist()


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: a JSON or YAML list of strings, or else one prompt per line."""
    if not path.is_file():
        raise InputError(f"{path}: prompts file does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml  # YAML is a superset of JSON

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"{path}: cannot parse prompts ({err})") from err
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"{path}: expected a list of strings")
        prompts = [p for p in data if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts in file")
    return prompts


# --------------------------------------------------------------------------------------------
# The check, step by step: validate, build the check tokens, score each model, compare
# --------------------------------------------------------------------------------------------

class _LogProbStore:
    """Log-probs of the model under test, one float32 row per check position, in a temp file."""

    def __init__(self, folder: Path, rows: int, vocab: int) -> None:
        self.rows = np.memmap(
            folder / "logprobs.f32", dtype=np.float32, mode="w+", shape=(rows, vocab)
        )

    def put(self, start: int, logp: torch.Tensor) -> None:
        self.rows[start : start + logp.shape[0]] = logp.numpy()

    def get(self, start: int, count: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.rows[start : start + count]))


Progress = Callable[[str, int, int], None]
"""Told (what, done, total) as work advances; the CLI draws bars from it, the library prints
nothing. total is 0 for a step without a count (loading a model)."""


def _quiet(what: str, done: int, total: int) -> None:
    pass


def validate_models(model: Path, against: list[Path]) -> Gemma2Config:
    """Every folder exists and is a Gemma 2 with one shared vocabulary (KL needs it); returns
    the config of `model`. Runs before any model is loaded, so bad input fails fast."""
    config = validate_folder(model)
    for other in against:
        other_config = validate_folder(other)
        if other_config.vocab_size != config.vocab_size:
            raise InputError(
                f"{other}: vocab_size {other_config.vocab_size} differs from {model}'s "
                f"{config.vocab_size}; KL needs the same vocabulary"
            )
    return config


def validate_folder(path: Path) -> Gemma2Config:
    if not path.exists():
        raise InputError(f"{path}: model folder does not exist")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    return Gemma2Config.from_folder(path)


def find_tokenizer(folders: list[Path]) -> Tokenizer | None:
    """The first tokenizer.json among the folders (merged outputs copy the init's)."""
    for folder in folders:
        tokenizer = load_tokenizer(folder)
        if tokenizer is not None:
            return tokenizer
    return None


def check_token_sequences(
    config: Gemma2Config, tokenizer: Tokenizer | None, prompts: list[str] | None, model: Path
) -> list[list[int]]:
    """The token sequences every model is scored on: the rendered prompts, or the built-in set."""
    if not prompts:
        return builtin_sequences(config.vocab_size, config.bos_token_id)
    if tokenizer is None:
        raise InputError(f"{model}: prompts need a tokenizer.json in the model folder")
    sequences = [encode_instruction(tokenizer, p) for p in prompts]
    too_big = [i for seq in sequences for i in seq if i >= config.vocab_size]
    if too_big:
        raise InputError(
            f"{model}: tokenizer produced id {too_big[0]} >= vocab_size {config.vocab_size}"
        )
    return sequences


def log_probs(model: Gemma2, ids: list[int]) -> torch.Tensor:
    """log softmax of the next-token logits at every position of one sequence, [T, V], float32."""
    return model.log_probs(torch.tensor([ids], device=model.device))[0].cpu()


def target_log_probs(logp: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 .. T-1, from `log_probs` rows, [T-1]."""
    targets = torch.tensor(ids[1:])
    return logp[:-1].gather(-1, targets[:, None])[:, 0]


def sequence_log_prob(model: Gemma2, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Σ_t log π(y_t | x, y_<t) over the completion: what the front's KL estimate is made of."""
    ids = list(prompt_ids) + list(completion_ids)
    logp = target_log_probs(log_probs(model, ids), ids)
    return float(logp[len(prompt_ids) - 1 :].double().sum())


@dataclass
class ModelScores:
    """One model on the check tokens: summed NLL and, per sequence, the argmax at each position."""

    nll_sum: float
    top1: list[torch.Tensor]


def score_model(
    model: Gemma2,
    sequences: list[list[int]],
    label: str,
    progress: Progress = _quiet,
    keep: _LogProbStore | None = None,
    starts: list[int] | None = None,
) -> ModelScores:
    """NLL and argmaxes of one model; with `keep`, its log-prob rows are stored for `compare`."""
    nll = 0.0
    top1: list[torch.Tensor] = []
    for i, ids in enumerate(sequences):
        logp = log_probs(model, ids)
        nll -= float(target_log_probs(logp, ids).double().sum())
        top1.append(logp.argmax(-1))
        if keep is not None and starts is not None:
            keep.put(starts[i], logp)
        progress(label, i + 1, len(sequences))
    return ModelScores(nll, top1)


def compare(
    model: Gemma2,
    sequences: list[list[int]],
    reference: _LogProbStore,
    starts: list[int],
    reference_top1: list[torch.Tensor],
    label: str,
    progress: Progress = _quiet,
) -> tuple[float, float, float, float]:
    """(summed NLL, summed KL(model‖ref), summed KL(ref‖model), agreeing positions)."""
    nll = kl = kl_rev = 0.0
    agree = 0
    for i, ids in enumerate(sequences):
        logp = log_probs(model, ids)
        ref = reference.get(starts[i], len(ids))
        nll -= float(target_log_probs(logp, ids).double().sum())
        diff = logp - ref
        # clamp: rounding can make a per-position KL of identical rows -1e-9
        kl += float((logp.exp() * diff).sum(-1).clamp_min(0).double().sum())
        kl_rev += float((ref.exp() * -diff).sum(-1).clamp_min(0).double().sum())
        agree += int((logp.argmax(-1) == reference_top1[i]).sum())
        progress(label, i + 1, len(sequences))
    return nll, kl, kl_rev, agree


def greedy_continuations(
    model: Gemma2,
    sequences: list[list[int]],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    label: str,
    progress: Progress = _quiet,
) -> list[str]:
    texts = []
    for i, ids in enumerate(sequences):
        new = model.generate(torch.tensor(ids, device=model.device), max_new_tokens,
                             stop_ids=stop_ids)
        texts.append(decode(tokenizer, new).strip())
        progress(f"{label} (generate)", i + 1, len(sequences))
    return texts


def check_models(
    model: Path,
    against: list[Path],
    dtype: torch.dtype = torch.float32,
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    progress: Progress | None = None,
    device: str = "cpu",
) -> CheckReport:
    """Run the check (see the module docstring) and return the report.

    Every input is validated before any model is loaded, so bad input fails fast.
    """
    model, against = Path(model), [Path(a) for a in against]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = parse_device(device)
    tell = progress or _quiet
    config = validate_models(model, against)
    tokenizer = find_tokenizer([model, *against]) if prompts else None
    sequences = check_token_sequences(config, tokenizer, prompts, model)
    starts = np.cumsum([0] + [len(s) for s in sequences]).tolist()
    stop_ids = stop_ids_for(tokenizer, config)
    dtype_name = str(dtype).removeprefix("torch.")

    def continuations(m: Gemma2, label: str) -> list[str] | None:
        if tokenizer is None:
            return None
        if not max_new_tokens:
            return [""] * len(sequences)
        return greedy_continuations(m, sequences, tokenizer, max_new_tokens, stop_ids, label,
                                    tell)

    def load(folder: Path) -> Gemma2:
        tell(f"loading {folder} ({dtype_name}, {device})", 0, 0)
        return Gemma2.from_pretrained(folder, dtype=dtype, device=device)

    with tempfile.TemporaryDirectory(prefix="warpmerge-check-") as tmp, torch.inference_mode():
        store = _LogProbStore(Path(tmp), starts[-1], config.vocab_size)
        main = load(model)
        label = model.name or str(model)
        scores = score_model(main, sequences, label, tell, keep=store, starts=starts)
        n_targets = starts[-1] - len(sequences)
        result = ModelCheck(str(model), scores.nll_sum / n_targets,
                            continuations=continuations(main, label))
        del main  # freed now (no reference cycles), before the next model loads

        compared: list[ModelCheck] = []
        for other in against:
            m = load(other)
            label = other.name or str(other)
            nll, kl, kl_rev, agree = compare(m, sequences, store, starts, scores.top1, label,
                                             tell)
            n = starts[-1]
            compared.append(
                ModelCheck(
                    str(other),
                    nll / n_targets,
                    kl=kl / n,
                    kl_reverse=kl_rev / n,
                    top1_agreement=agree / n,
                    continuations=continuations(m, label),
                )
            )
            del m
        del store  # unmap before the temporary folder is removed

    return CheckReport(
        model=result,
        against=compared,
        dtype=dtype_name,
        source="prompts" if prompts else "builtin",
        num_sequences=len(sequences),
        num_positions=starts[-1],
        num_targets=n_targets,
        prompts=prompts or None,
        max_new_tokens=max_new_tokens,
        sequence_lengths=[len(s) for s in sequences],
    )


def parse_dtype(name: str) -> torch.dtype:
    """'float32', 'bf16', ... -> the torch dtype; ConfigError (the CLI names its flag)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"dtype must be float32 or bfloat16, got {name!r}") from None


DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def parse_device(name: str) -> str:
    """cpu | cuda | cuda:N | mps, and present on this machine: else a ConfigError."""
    name = str(name).strip().lower()
    if not DEVICE.match(name):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps: MPS is not available on this machine")
    return name


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _shorten(text: str, width: int) -> str:
    """Keep the end of a long path: the folder name is the informative part."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def format_report(report: CheckReport, width: int | None = None) -> str:
    """The report as a terminal table, then the continuations side by side."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    rows = [report.model, *report.against]
    name_w = max(12, min(48, max(len(r.path) for r in rows) + 2, width - 50))
    what = (
        f"{report.num_sequences} built-in sequences"
        if report.source == "builtin"
        else f"{report.num_sequences} prompts"
    )
    lines = [
        f"warpmerge check: {report.dtype}, {what}, {report.num_positions} positions",
        "",
        f"{'model':<{name_w}} {'NLL':>9} {'KL(a‖m)':>10} {'KL(m‖a)':>10} {'top-1':>7}",
    ]

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for i, r in enumerate(rows):
        label = _shorten(r.path, name_w - 2) + (" *" if i == 0 else "")
        agree = "—" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%"
        lines.append(
            f"{label:<{name_w}} {r.nll:>9.4f} {num(r.kl, '.4g'):>10} "
            f"{num(r.kl_reverse, '.4g'):>10} {agree:>7}"
        )
    lines += [
        "",
        "* the model under test (m); the others are the --against models (a).",
        "NLL: mean next-token negative log-likelihood on the check tokens (nats, lower is better).",
        "KL: mean per-position KL divergence of the next-token distributions (nats); KL(m‖a)",
        "against the init is the x-axis of the WARP paper. top-1: positions with the same argmax.",
    ]
    if report.prompts and rows[0].continuations is not None:
        lines += ["", "Greedy continuations", ""]
        lines += _side_by_side(report, rows, width)
    return "\n".join(lines)


def _side_by_side(report: CheckReport, rows: list[ModelCheck], width: int) -> list[str]:
    """One block per prompt, one column per model (stacked when the terminal is too narrow)."""
    assert report.prompts is not None
    gap = " │ "
    col_w = (width - len(gap) * (len(rows) - 1)) // len(rows)
    stacked = col_w < 24
    lines: list[str] = []
    for p, prompt in enumerate(report.prompts):
        first_line = prompt.splitlines()[0] if prompt.strip() else prompt
        if len(first_line) > width - 6 or first_line != prompt.strip():
            first_line = first_line[: width - 7].rstrip() + "…"
        lines.append(f"[{p + 1}] {first_line}")
        columns = []
        for i, r in enumerate(rows):
            text = (r.continuations or [""] * len(report.prompts))[p] or "(nothing)"
            head = _shorten(Path(r.path).name or r.path, (width if stacked else col_w) - 4)
            head += " *" if i == 0 else ""
            wrap_w = width - 2 if stacked else col_w
            body = [
                w
                for para in text.splitlines() or [""]
                for w in (textwrap.wrap(para, wrap_w) or [""])
            ]
            columns.append([head, "─" * min(wrap_w, max(len(head), 8)), *body])
        if stacked:
            for column in columns:
                lines += ["  " + line for line in column] + [""]
        else:
            height = max(len(c) for c in columns)
            for k in range(height):
                cells = [(c[k] if k < len(c) else "").ljust(col_w) for c in columns]
                lines.append(gap.join(cells).rstrip())
            lines.append("")
    return lines
