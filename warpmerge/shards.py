"""The output's shard layout: which tensor goes in which file, decided once per merge.

Every output shape and dtype is known before the first byte is computed, so the layout, the
file names and each shard's header are fixed up front, as data. The writers, the dry run and
the resume journal all read this one layout. Names and the index follow transformers
(`model-00001-of-00003.safetensors`, `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import torch

from .modelfolder import DTYPE_CODES, SINGLE_FILE


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


@dataclass(frozen=True)
class ShardLayout:
    """The shards of one output model, in write order, each a tuple of tensors."""

    shards: tuple[tuple[OutTensor, ...], ...]

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(shard_names(len(self.shards)))

    @cached_property
    def tensors(self) -> tuple[OutTensor, ...]:
        return tuple(t for shard in self.shards for t in shard)

    @cached_property
    def shard_of(self) -> dict[str, int]:
        """Tensor name -> index of the shard that holds it."""
        return {t.name: i for i, shard in enumerate(self.shards) for t in shard}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def index(self) -> dict | None:
        """The `model.safetensors.index.json` content; None for a single file."""
        if len(self.shards) == 1:
            return None
        return {"metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: self.names[self.shard_of[t.name]] for t in self.tensors}}

    def header(self, shard: int) -> bytes:
        return encode_header(self.shards[shard])


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> ShardLayout:
    """Greedy split in write order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return ShardLayout(tuple(tuple(s) for s in shards))


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def encode_header(tensors: tuple[OutTensor, ...] | list[OutTensor]) -> bytes:
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

