"""Writing a sharded safetensors model tensor by tensor, never buffering a shard.

Every output shape and dtype is known before the first byte is computed, so the shard layout and
each shard's header are fixed up front: a shard file is opened, its header written, and tensor
bytes appended in order as the engine produces them. File names and the index follow
transformers (`model-00001-of-00003.safetensors`, `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .sources import DTYPE_CODES, INDEX_FILE, SINGLE_FILE


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in write order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def encode_header(tensors: list[OutTensor]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8-byte alignment."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class ShardedWriter:
    """Streams one model's tensors, in plan order, into its shard files inside `folder`."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.order = [t for shard in self.shards for t in shard]
        self._shard_starts = set()
        first = 0
        for shard in self.shards:
            self._shard_starts.add(first)
            first += len(shard)
        self._shard = -1
        self._file = None
        self._next = 0  # index into self.order of the tensor being written
        self._left = 0  # bytes still expected for it

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.order)

    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        path = self.folder / self.names[self._shard]
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in finish()
        self._file.write(encode_header(self.shards[self._shard]))

    def begin_tensor(self, name: str) -> None:
        expected = self.order[self._next]
        if name != expected.name or self._left:
            raise RuntimeError(f"writer expected {expected.name}, got {name}")
        if self._next in self._shard_starts:
            self._open_next_shard()
        self._left = expected.nbytes
        self._next += 1

    def write(self, data: torch.Tensor | bytes | memoryview) -> None:
        """Append bytes of the current tensor (a contiguous tensor is written as its bytes)."""
        if isinstance(data, torch.Tensor):
            data = memoryview(data.view(torch.uint8).numpy()) if data.numel() else b""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n > self._left:
            raise RuntimeError("writer got more bytes than the tensor holds")
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = self._file.write(view)
            view = view[written:]
        self._left -= n

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._next != len(self.order) or self._left:
            raise RuntimeError("writer closed before every tensor was written")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Staging:
    """Builds an output folder beside its target and renames it into place only when complete.

    A run killed at any moment leaves either nothing or a `.NAME.warpmerge-partial` folder,
    which the next run clears; nothing half-written ever carries the final name.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.warpmerge-partial"

    def create(self) -> Path:
        import shutil

        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return self.path

    def commit(self) -> None:
        """Swap the finished folder in; an existing target (with --force) is replaced."""
        import shutil

        old = self.target.parent / f".{self.target.name}.warpmerge-old"
        if self.target.exists():
            if old.exists():
                shutil.rmtree(old)
            self.target.rename(old)
        self.path.rename(self.target)
        if old.exists():
            shutil.rmtree(old)

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
