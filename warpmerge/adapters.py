"""Checkpoints saved as PEFT LoRA / DoRA adapters, read as task vectors on top of the init.

An adapter folder stands for the model PEFT's `merge_and_unload()` gives on top of θ_init; this
module turns it into ΔW = θ_checkpoint − θ_init, one chunk of one tensor at a time, so that
the merge treats adapter and full checkpoints alike and never forms a whole ΔW.

Only small factors (A, B, DoRA magnitudes, LoRA biases) are held in memory. Full-size saved
tensors (`modules_to_save`, an embedding's `base_layer.weight`, saved biases) are read lazily,
by the chunk. Low-rank products are computed by row blocks on a grid fixed per tensor, so a
chunk's values never depend on where chunks start or end: every element is computed by the
same operations on the same operands whatever the chunking.

Trainer files beside the weights (optimizer.pt, scheduler.pt, rng_state*.pth, ...) are never
opened: only `adapter_config.json` and `adapter_model.safetensors` are.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_config import CONFIG_FILE, LoraSpec, read_lora_config
from .errors import InputError, RunError
from .modelfolder import FileInfo, TensorInfo, inside_folder, read_header

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."  # how PEFT prefixes the base model's names in what it saves
ROW_BLOCK = 1 << 15  # elements per row block of a low-rank product (rounded to whole rows)
# what PEFT saves per adapted module, by key suffix
FACTORS = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
    "lora_B.bias": "bias", "lora_magnitude_vector": "magnitude",
}

ReadInit = Callable[[int, int], torch.Tensor]


def is_adapter(folder: Path) -> bool:
    """A checkpoint folder is an adapter when it holds adapter_config.json."""
    return (folder / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class LowRank:
    """scale·B@A for one module, laid out as the weight is stored.

    `transposed`: the stored weight is (B@A)ᵀ-shaped, as for embeddings (A is [r, vocab]) and
    GPT-2-style Conv1D layers (weights stored [in, out]).
    """

    a: torch.Tensor  # [r, n_a] float32
    b: torch.Tensor  # [n_b, r] float32
    scale: float
    transposed: bool

    def rows(self, first: int, end: int) -> torch.Tensor:
        """Rows [first, end) of the stored-layout product, PEFT's order of operations:
        the matrix product, then the scaling."""
        if self.transposed:
            return (self.b @ self.a[:, first:end]).T * self.scale
        return (self.b[first:end] @ self.a) * self.scale


@dataclass(frozen=True)
class TensorEdit:
    """What one checkpoint does to one init tensor W0 (every part optional).

    base:      a saved full tensor that replaces W0 (modules_to_save, `base_layer.weight`,
               a bias saved by `bias: all|lora_only`);
    low_rank:  LoRA's scale·B@A, added to the (replaced) weight;
    magnitude: DoRA: each row of the result is rescaled to this norm;
    offset:    `lora_bias`: scale·lora_B.bias, added to the (replaced) bias.
    """

    name: str
    shape: tuple[int, ...]
    base: TensorInfo | None = None
    low_rank: LowRank | None = None
    magnitude: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def delta(self, start: int, count: int, read_init: ReadInit) -> torch.Tensor:
        """ΔW for the flat elements [start, start+count), float32."""
        if self.low_rank is None:
            out = (torch.zeros(count) if self.base is None
                   else read_elements(self.base, start, count) - read_init(start, count))
            if self.offset is not None:
                out += self.offset[start:start + count]
            return out
        n_rows, cols = self.shape
        per_block = max(1, ROW_BLOCK // cols)
        first = start // cols // per_block * per_block
        end = min(n_rows, -(-(start + count) // cols))
        blocks = [self._rows(row, min(row + per_block, n_rows), read_init)
                  for row in range(first, end, per_block)]
        skip = start - first * cols
        return torch.cat(blocks)[skip:skip + count]

    def _rows(self, first: int, end: int, read_init: ReadInit) -> torch.Tensor:
        """ΔW of whole rows [first, end), flat: DoRA needs whole rows for their norms."""
        product = self.low_rank.rows(first, end)
        if self.base is None and self.magnitude is None:
            return product.reshape(-1)
        cols = self.shape[1]
        w0 = read_init(first * cols, (end - first) * cols).view(end - first, cols)
        weight = w0 if self.base is None else read_elements(
            self.base, first * cols, (end - first) * cols).view(end - first, cols)
        merged = weight + product
        if self.magnitude is not None:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.magnitude[first:end] / norm).view(-1, 1) * merged
        return (merged - w0).reshape(-1)


@dataclass(frozen=True)
class Adapter:
    """One adapter checkpoint: the init tensors it changes, and how."""

    label: str
    folder: Path
    base_model: str | None  # base_model_name_or_path, as saved
    edits: Mapping[str, TensorEdit]  # by init tensor name
    warnings: tuple[str, ...]
    files: tuple[FileInfo, ...] = ()  # what the adapter was read from, for provenance

    def changes(self, name: str) -> bool:
        """False: the tensor equals the init's in this checkpoint (no need to read anything)."""
        return name in self.edits

    @property
    def nbytes(self) -> int:
        """Memory its factors take (a saved full tensor is read from disk when needed)."""
        return sum(t.numel() * t.element_size() for e in self.edits.values()
                   for t in (e.magnitude, e.offset,
                             *((e.low_rank.a, e.low_rank.b) if e.low_rank else ()))
                   if t is not None)

    def delta(self, name: str, start: int, count: int,
              read_init: ReadInit) -> torch.Tensor | None:
        """θ_checkpoint − θ_init for the flat elements [start, start+count) of init tensor
        `name`, float32; None when this checkpoint leaves the tensor unchanged.
        `read_init(start, count)` gives the init's elements of that tensor as float32."""
        edit = self.edits.get(name)
        return None if edit is None else edit.delta(start, count, read_init)


def fuse_low_rank(weighted: list[tuple[float, AdapterCheckpoint]],
                  name: str) -> TensorEdit | None:
    """Σ_t a_t·ΔW_t of one run's adapter checkpoints on tensor `name` as ONE low-rank product,
    [a_1·s_1·B_1 | a_2·s_2·B_2 | …] @ [A_1; A_2; …] (the spec's low-rank insight): a single
    matmul of rank Σ r_t per row block instead of one per checkpoint plus the sums.

    None when that is not exact: a checkpoint changes the tensor other than by plain LoRA
    (DoRA, a saved full tensor, lora_bias), the layouts differ, or no checkpoint changes it.
    """
    parts = [(a, c.adapter.edits.get(name)) for a, c in weighted]
    parts = [(a, e) for a, e in parts if e is not None]
    if not parts or any(e.low_rank is None or e.base is not None or e.magnitude is not None
                        or e.offset is not None for _, e in parts):
        return None
    if len({e.low_rank.transposed for _, e in parts}) != 1:
        return None
    edit = parts[0][1]
    a = torch.cat([e.low_rank.a for _, e in parts])
    b = torch.cat([e.low_rank.b * (w * e.low_rank.scale) for w, e in parts], dim=1)
    return TensorEdit(edit.name, edit.shape,
                      low_rank=LowRank(a, b, 1.0, edit.low_rank.transposed))


def read_elements(info: TensorInfo, start: int, count: int) -> torch.Tensor:
    """Elements [start, start+count) of a saved tensor, as float32 (header checks made sure the
    tensor lies inside its file)."""
    if count == 0:
        return torch.empty(0)
    size = info.dtype.itemsize
    try:
        with open(info.file, "rb") as f:
            data = os.pread(f.fileno(), count * size, info.offset + start * size)
    except FileNotFoundError:  # training deleted the checkpoint (save_total_limit)
        raise RunError(f"{info.file} was deleted during the merge") from None
    if len(data) != count * size:
        raise InputError(f"{info.file.parent.name}: {info.file.name}: tensor {info.name} "
                         "is truncated")
    return torch.frombuffer(bytearray(data), dtype=info.dtype).to(torch.float32)


def _read_whole(info: TensorInfo) -> torch.Tensor:
    return read_elements(info, 0, info.numel).view(info.shape)


def open_adapter(folder: Path, label: str, init: Mapping[str, TensorInfo],
                 init_ref: str | None = None, trust_links: bool = False) -> Adapter:
    """Read and check an adapter checkpoint against the init's tensors.

    Every problem is an InputError naming the file and the key. `init_ref` (how the user named
    the init) is compared with the adapter's base_model_name_or_path: a mismatch is only a
    warning, since runs are often trained from a local copy.
    """
    spec = read_lora_config(folder, label)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / PICKLED_WEIGHTS).exists():
            raise InputError(f"{label}: only pickled weights ({PICKLED_WEIGHTS}); warpmerge "
                             "never loads pickles: save the adapter with safetensors")
        raise InputError(f"{label}: missing file {WEIGHTS_FILE}")
    inside_folder(folder, WEIGHTS_FILE, WEIGHTS_FILE, label, trust_links)
    saved, weights_info = read_header(path, label)
    edits = _Resolver(spec, init, saved, f"{label}: {WEIGHTS_FILE}").edits()
    warnings = []
    base = spec.base_model_name_or_path
    if base and init_ref and not _same_model(base, init_ref):
        warnings.append(f"{label}: the adapter was trained on {base!r}, the init is "
                        f"{init_ref!r}; merging it on top of the init")
    config_bytes = (folder / CONFIG_FILE).read_bytes()
    files = (FileInfo(CONFIG_FILE, len(config_bytes), hashlib.sha256(config_bytes).hexdigest()),
             weights_info)
    return Adapter(label, folder, base, edits, tuple(warnings), files)


def _same_model(a: str, b: str) -> bool:
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


class _Resolver:
    """Sorts the saved tensors into per-tensor edits, checking each against the init."""

    def __init__(self, spec: LoraSpec, init: Mapping[str, TensorInfo],
                 saved: Mapping[str, TensorInfo], where: str) -> None:
        self.spec, self.init, self.saved, self.where = spec, init, saved, where
        self.factors: dict[str, dict[str, TensorInfo]] = {}  # by module
        self.replaced: dict[str, TensorInfo] = {}  # by init tensor name

    def fail(self, message: str) -> InputError:
        return InputError(f"{self.where}: {message}")

    def edits(self) -> dict[str, TensorEdit]:
        for key, info in self.saved.items():
            self._sort(key, info)
        edits: dict[str, TensorEdit] = {}
        for module, parts in self.factors.items():
            edits.update(self._module(module, parts))
        for name, info in self.replaced.items():
            edits[name] = TensorEdit(name, self.init[name].shape, base=info)
        return edits

    def _sort(self, key: str, info: TensorInfo) -> None:
        if not key.startswith(PREFIX):
            raise self.fail(f"unknown tensor {key} (PEFT names start with {PREFIX})")
        name = key[len(PREFIX):]
        for suffix, part in FACTORS.items():
            if name.endswith("." + suffix):
                module = name[:-len(suffix) - 1]
                parts = self.factors.setdefault(module, {})
                if part in parts:
                    raise self.fail(f"tensor {key}: module {module} has two {part} factors")
                if not info.dtype.is_floating_point:
                    raise self.fail(f"tensor {key} is not floating point")
                parts[part] = info
                return
        if ".lora_" in name or name.startswith("lora_"):
            raise self.fail(f"unknown tensor {key} (not a LoRA or DoRA factor)")
        for kind in ("weight", "bias"):  # a targeted module's own parameter
            if name.endswith(f".base_layer.{kind}"):
                name = name[:-len(f"base_layer.{kind}")] + kind
        target = self.init.get(name)
        if target is None:
            raise self.fail(f"unknown tensor {key} (the init has no tensor {name})")
        if info.shape != target.shape:
            raise self.fail(f"tensor {key} has shape {list(info.shape)}, the init's {name} "
                            f"has {list(target.shape)}")
        if not (info.dtype.is_floating_point and target.is_float):
            raise self.fail(f"tensor {key} is not floating point")
        self.replaced[name] = info

    def _module(self, module: str, parts: dict[str, TensorInfo]) -> dict[str, TensorEdit]:
        """The edits of one adapted module: its weight's, and its bias's with lora_bias."""
        key = PREFIX + module
        if "A" not in parts or "B" not in parts:
            found = next(iter(parts.values())).name
            raise self.fail(f"tensor {found}: module {module} lacks its "
                            f"{'lora_A' if 'A' not in parts else 'lora_B'} factor")
        a_info, b_info = parts["A"], parts["B"]
        if not self.spec.targets(module):
            raise self.fail(f"tensor {a_info.name}: module {module} is not one that "
                            "target_modules selects")
        weight_name = module + ".weight"
        w0 = self.init.get(weight_name)
        if w0 is None:
            raise self.fail(f"tensor {a_info.name}: the init has no tensor {weight_name}")
        r, _ = self.spec.rank_alpha(module)
        if len(a_info.shape) != 2 or len(b_info.shape) != 2 or len(w0.shape) != 2:
            raise self.fail(f"tensor {a_info.name}: LoRA factors and weight must be matrices")
        for info, rank in ((a_info, a_info.shape[0]), (b_info, b_info.shape[1])):
            if rank != r:
                raise self.fail(f"tensor {info.name} has rank {rank}, the config gives "
                                f"{module} r={r}")
        n_a, n_b = a_info.shape[1], b_info.shape[0]
        embedding = a_info.name.endswith("lora_embedding_A")
        transposed = self._layout(w0, n_a, n_b, embedding, a_info.name)
        low_rank = LowRank(_read_whole(a_info), _read_whole(b_info), self.spec.scaling(module),
                           transposed)
        magnitude = self._magnitude(module, parts.get("magnitude"), transposed, n_b, key)
        edits = {weight_name: TensorEdit(weight_name, w0.shape,
                                         base=self.replaced.pop(weight_name, None),
                                         low_rank=low_rank, magnitude=magnitude)}
        if "bias" in parts:
            edits.update(self._lora_bias(module, parts["bias"], n_b, low_rank.scale))
        return edits

    def _layout(self, w0: TensorInfo, n_a: int, n_b: int, embedding: bool, key: str) -> bool:
        """Whether ΔW is (B@A)ᵀ in the stored layout. PEFT decides by the layer's type, which
        a weight file does not say; its shape does, except for a square Conv1D weight, where
        the saved fan_in_fan_out (which PEFT sets from the layer type) decides."""
        shape = tuple(w0.shape)
        if embedding:
            if shape == (n_a, n_b):
                return True
        elif shape == (n_b, n_a) and not (n_a == n_b and self.spec.fan_in_fan_out):
            return False
        elif shape == (n_a, n_b):
            return True
        raise self.fail(f"tensor {key}: factors of shape [r, {n_a}] and [{n_b}, r] do not fit "
                        f"the init's {w0.name} of shape {list(shape)}")

    def _magnitude(self, module: str, info: TensorInfo | None, transposed: bool, n_out: int,
                   key: str) -> torch.Tensor | None:
        if not self.spec.use_dora:
            if info is not None:
                raise self.fail(f"tensor {info.name}: a DoRA magnitude, but use_dora is false")
            return None
        if info is None:
            raise self.fail(f"use_dora is true but module {module} has no "
                            f"{key}.lora_magnitude_vector")
        if transposed:
            raise self.fail(f"tensor {info.name}: DoRA on an embedding or Conv1D layer "
                            "(column norms) is not supported")
        if tuple(info.shape) != (n_out,):
            raise self.fail(f"tensor {info.name} has shape {list(info.shape)}, expected "
                            f"[{n_out}]")
        return _read_whole(info)

    def _lora_bias(self, module: str, info: TensorInfo, n_out: int,
                   scale: float) -> dict[str, TensorEdit]:
        if not self.spec.lora_bias:
            raise self.fail(f"tensor {info.name}: a LoRA bias, but lora_bias is false")
        bias_name = module + ".bias"
        bias = self.init.get(bias_name)
        if bias is None:
            raise self.fail(f"tensor {info.name}: the init has no tensor {bias_name} to add "
                            "it to (PEFT cannot merge it either)")
        if tuple(info.shape) != (n_out,) or tuple(bias.shape) != (n_out,):
            raise self.fail(f"tensor {info.name} has shape {list(info.shape)}, the init's "
                            f"{bias_name} has {list(bias.shape)}")
        return {bias_name: TensorEdit(bias_name, bias.shape,
                                      base=self.replaced.pop(bias_name, None),
                                      offset=_read_whole(info) * scale)}


@dataclass
class AdapterCheckpoint:
    """An adapter checkpoint as a merge input: θ_init plus the adapter's ΔW.

    It stores none of the model's tensors (`tensors` is empty): the merge asks it for task
    vectors (`delta`) chunk by chunk, computed from the factors held in memory, so a merge of
    adapter runs reads little more than the init.
    """

    label: str
    ref: str
    path: Path
    adapter: Adapter
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    download_bytes: int = 0
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _stamp: tuple[int, ...] | None = None

    @property
    def files(self) -> list[FileInfo]:
        return list(self.adapter.files)

    def read_nbytes(self, name: str) -> int:
        """Bytes a pass reads for this tensor: only saved full tensors are read from disk."""
        edit = self.adapter.edits.get(name)
        return edit.base.nbytes if edit is not None and edit.base is not None else 0

    def delta(self, name: str, start: int, count: int,
              read_init: ReadInit) -> torch.Tensor | None:
        return self.adapter.delta(name, start, count, read_init)

    def open_files(self) -> None:
        self._stamp = _stamp(self.path / WEIGHTS_FILE)

    def check_unchanged(self) -> None:
        """The weights file must be the one planned from (training may still be writing)."""
        path = self.path / WEIGHTS_FILE
        try:
            now = _stamp(path)
        except FileNotFoundError:
            raise RunError(f"{self.label}: {path} was deleted during the merge") from None
        if self._stamp is not None and now != self._stamp:
            raise RunError(f"{self.label}: {path} was replaced or modified during the merge")

    def close(self) -> None:
        self._stamp = None


def _stamp(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
