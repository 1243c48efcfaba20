"""The safetensors model folder: the one module that knows what a model on disk is.

Which files hold the weights (`model.safetensors`, or the shards an index names), what their
headers say, which dtypes exist, which files travel with a model (config, tokenizer), and how to
read a tensor's bytes. Headers are parsed here rather than by a library so that every offset,
size and file name is checked before use: these files come from many places and must never make
us read outside the model folder. Pickled checkpoints are refused, never loaded.

Every reader of weights uses this module: the merge's inputs, the Hub download rules and the
Gemma 2 loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, RunError

# safetensors dtype code -> torch dtype. Floats are merged; the rest are copied from the init.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
# the dtypes a model is written or computed in, by the names configs and flags use
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
MAX_HEADER = 100 * 2**20
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
HEAD_NAME, EMBED_NAME = "lm_head.weight", "model.embed_tokens.weight"
# copied from the init into every output, besides config.json
MODEL_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "vocab.txt",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    header_sha256: str


@dataclass
class Checkpoint:
    """One model on disk: its tensors (in storage order) and where it came from."""

    label: str  # how messages name it, e.g. "run-a checkpoint 2 (step-2000)"
    ref: str  # what the user wrote
    path: Path
    tensors: dict[str, TensorInfo]
    files: list[FileInfo]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    download_bytes: int = 0
    trust_links: bool = False  # a Hub snapshot: its files are links into the cache
    _files: dict[Path, OpenFile] = field(default_factory=dict, repr=False, compare=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def lookup(self, name: str) -> TensorInfo | None:
        """The tensor, with an absent lm_head.weight meaning 'tied to the embedding'."""
        info = self.tensors.get(name)
        if info is None and name == HEAD_NAME:
            info = self.tensors.get(EMBED_NAME)
        return info

    def read_nbytes(self, name: str) -> int:
        """Bytes a pass over tensor `name` reads from this model."""
        return self.lookup(name).nbytes

    def read(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, in a new tensor of its dtype."""
        raw = torch.empty(count * info.dtype.itemsize, dtype=torch.uint8)
        return self.read_into(info, start, count, raw)

    def read_into(self, info: TensorInfo, start: int, count: int,
                  raw: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, read into `raw` (bytes, large enough).

        `pread`, not a file map: an input truncated under a running merge then shows as a
        short read, reported as a RunError naming the file, where a map would kill the
        process with SIGBUS. Header checks made sure every tensor lies inside its file.
        """
        nbytes = count * info.dtype.itemsize
        opened = self._files.get(info.file) or self._open(info.file)
        opened.read(raw.numpy()[:nbytes], info.offset + start * info.dtype.itemsize)
        return raw[:nbytes].view(info.dtype)

    def _open(self, path: Path) -> OpenFile:
        with self._opening:
            opened = self._files.get(path)
            if opened is None:
                size = next(f.size for f in self.files if self.path / f.name == path)
                opened = self._files[path] = OpenFile.open(path, size, self.label)
        return opened

    def open_files(self) -> None:
        """Open every file up front, checking each is the one planned (its size)."""
        for info in self.tensors.values():
            if info.file not in self._files:
                self._open(info.file)

    def check_unchanged(self) -> None:
        """Raise RunError if a file opened for this merge was since replaced, deleted,
        truncated or rewritten (training still saving and deleting checkpoints)."""
        for opened in self._files.values():
            opened.check_unchanged()

    def close(self) -> None:
        for opened in self._files.values():
            opened.close()
        self._files.clear()


@dataclass
class OpenFile:
    """One input file open for reading, with what identified it when it was opened."""

    path: Path
    label: str
    fd: int
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns

    @classmethod
    def open(cls, path: Path, planned_size: int, label: str) -> OpenFile:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RunError(f"{label}: {path} was deleted during the merge") from None
        except OSError as exc:
            raise RunError(f"{label}: cannot read {path}: {exc.strerror}") from None
        opened = cls(path, label, fd, _identity(os.fstat(fd)))
        if opened.identity[2] != planned_size:
            opened.close()
            raise RunError(f"{label}: {path} changed during the merge (its size)")
        return opened

    def read(self, out: memoryview, offset: int) -> None:
        """Fill `out` from `offset`; a short read means the file was truncated."""
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise RunError(f"{self.label}: {self.path} was truncated during the merge")
            done += got

    def check_unchanged(self) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise RunError(f"{self.label}: {self.path} was deleted during the merge") from None
        if _identity(now)[:2] != self.identity[:2]:
            raise RunError(f"{self.label}: {self.path} was replaced during the merge")
        opened = _identity(os.fstat(self.fd))
        if opened[2] < self.identity[2]:
            raise RunError(f"{self.label}: {self.path} was truncated during the merge")
        if opened != self.identity:
            raise RunError(f"{self.label}: {self.path} was modified during the merge")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _show(name: str) -> str:
    """A file name for a message: as is, or quoted when it holds control characters."""
    return name if name.isprintable() else repr(name)


def inside_folder(folder: Path, name: str, what: str, label: str, trust_links: bool) -> Path:
    """The path of `name` in `folder`, refusing names and links that lead outside it."""
    if (not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..")
            or os.path.isabs(name)):
        raise InputError(f"{label}: {what} names a file outside the model folder: {name!r}")
    path = folder / name
    if not trust_links and path.is_symlink() and not path.resolve().is_relative_to(
            _link_root(folder)):
        raise InputError(f"{label}: {_show(name)} is a symlink leading outside the model folder")
    return path


def _link_root(folder: Path) -> Path:
    """Where a model folder's links may lead: inside it, or for a Hub cache snapshot
    (models--org--name/snapshots/<sha>), inside that repo's cache folder (its blobs)."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def read_header(path: Path, label: str) -> tuple[dict[str, TensorInfo], FileInfo]:
    """Read one safetensors header from disk and check it (see `parse_header`)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{label}: {path.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise InputError(f"{label}: {path.name} has a corrupt safetensors header")
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{label}: missing file {path.name}") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read {path.name}: {exc.strerror}") from None
    return parse_header(raw, size, path, label), FileInfo(
        path.name, size, hashlib.sha256(head + raw).hexdigest())


def parse_header(raw: bytes, size: int, path: Path, label: str) -> dict[str, TensorInfo]:
    """Check a header's JSON against its file size: every tensor must lie inside the data."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{label}: {path.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise InputError(f"{label}: {path.name} has a corrupt safetensors header")
    data_start = 8 + len(raw)
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{label}: {path.name}: tensor {name!r} has a corrupt header entry"
        if not isinstance(entry, dict):
            raise InputError(bad)
        code = entry.get("dtype")
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise InputError(f"{label}: {path.name}: tensor {name} has unsupported dtype "
                             f"{entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise InputError(bad)
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise InputError(f"{label}: {path.name}: tensor {name} lies outside the file "
                             "(truncated or corrupt)")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    return tensors


def parse_index(text: str, label: str) -> dict[str, str]:
    """The weight map of a `model.safetensors.index.json`: tensor name -> shard file name."""
    bad = InputError(f"{label}: {INDEX_FILE} is not a valid index")
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise bad from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise bad
    if not weight_map:
        raise InputError(f"{label}: {INDEX_FILE} lists no tensors")
    return weight_map


def weight_files(names: Collection[str], weight_map: dict[str, str] | None, label: str,
                 where: str) -> list[str]:
    """The safetensors files that hold a model, given the names of the files in its folder.

    The index's shards when there is an index; else `model.safetensors`; else the folder's one
    and only `*.safetensors` file. Pickled weights are named as such: never loaded.
    """
    if weight_map is not None:
        return list(dict.fromkeys(weight_map.values()))
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    others = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if len(others) == 1:
        return others
    if any(n in PICKLE_FILES or n.endswith(".bin") for n in names):
        raise InputError(f"{label}: only pickled weights (.bin) in {where}; warpmerge "
                         "never loads pickles: convert them to safetensors first")
    raise InputError(f"{label}: no model.safetensors or {INDEX_FILE} in {where}")


def open_checkpoint(path: Path, label: str, ref: str | None = None, trust_links: bool = False,
                    remote: dict[str, tuple[bytes, int]] | None = None) -> Checkpoint:
    """Open a model folder: `model.safetensors`, or the shards an index names.

    `remote` maps shard names not downloaded (a Hub dry run) to (header JSON, file size).
    """
    if not path.exists():
        raise InputError(f"{label}: folder not found: {ref or path}")
    if not path.is_dir():
        raise InputError(f"{label}: not a folder: {ref or path}")
    weight_map = None
    if (path / INDEX_FILE).exists():
        index_path = inside_folder(path, INDEX_FILE, "index", label, trust_links)
        try:
            text = index_path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            raise InputError(f"{label}: {INDEX_FILE} is not a valid index") from None
        weight_map = parse_index(text, label)
    names = {p.name for p in path.iterdir()} | set(remote or ())
    shard_names = weight_files(names, weight_map, label, ref or str(path))
    tensors: dict[str, TensorInfo] = {}
    files: list[FileInfo] = []
    for shard in shard_names:
        file_path = inside_folder(path, shard, INDEX_FILE, label, trust_links)
        if remote and shard in remote and not file_path.exists():
            raw, size = remote[shard]
            found = parse_header(raw, size, file_path, label)
            info = FileInfo(shard, size, hashlib.sha256(len(raw).to_bytes(8, "little") + raw)
                            .hexdigest())
        elif not file_path.exists():
            raise InputError(f"{label}: {INDEX_FILE} names a missing shard {_show(shard)}")
        else:
            found, info = read_header(file_path, label)
        files.append(info)
        if weight_map is None:
            tensors.update(found)
        else:
            for name, file in weight_map.items():
                if file == shard:
                    if name not in found:
                        raise InputError(f"{label}: {INDEX_FILE} maps {name} to {shard}, "
                                         "which does not contain it")
                    tensors[name] = found[name]
    ordered = dict(sorted(tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)))
    return Checkpoint(label, ref or str(path), path, ordered, files, trust_links=trust_links)


def read_model_config(ckpt: Checkpoint) -> dict | None:
    """The model's config.json, checked along with the other files the output copies:
    none may be a link leading outside the folder, and config.json must be a JSON object."""
    for name in ("config.json", *MODEL_FILES):
        if (ckpt.path / name).exists():
            inside_folder(ckpt.path, name, name, ckpt.label, ckpt.trust_links)
    path = ckpt.path / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{ckpt.label}: config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise InputError(f"{ckpt.label}: config.json is not a JSON object")
    return config
