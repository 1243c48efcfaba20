"""The output writer on its own: shard layout, names, headers and index, as transformers has them.

Headers are parsed back with the `safetensors` library itself, not with warpmerge's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from warpmerge.shards import OutTensor, encode_header, plan_shards, shard_names
from warpmerge.writer import ShardedWriter


def out(name: str, nbytes: int) -> OutTensor:
    return OutTensor(name, torch.uint8, (nbytes,))


def layout(tensors: list[OutTensor], max_bytes: int) -> list[list[str]]:
    return [[t.name for t in shard] for shard in plan_shards(tensors, max_bytes).shards]


def test_shards_fill_greedily_in_write_order():
    tensors = [out("a", 4), out("b", 6), out("c", 4), out("d", 3), out("e", 3)]
    # a+b is exactly the limit; c+d+e as well
    assert layout(tensors, 10) == [["a", "b"], ["c", "d", "e"]]
    assert layout(tensors, 9) == [["a"], ["b"], ["c", "d"], ["e"]]


def test_a_tensor_over_the_limit_gets_a_shard_of_its_own():
    tensors = [out("small", 2), out("huge", 50), out("tail", 2), out("end", 2)]
    assert layout(tensors, 10) == [["small"], ["huge"], ["tail", "end"]]
    assert layout([out("huge", 50)], 10) == [["huge"]]


def test_shard_names_follow_transformers():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == ["model-00001-of-00003.safetensors",
                              "model-00002-of-00003.safetensors",
                              "model-00003-of-00003.safetensors"]
    assert shard_names(12)[9] == "model-00010-of-00012.safetensors"


def test_out_tensor_bytes():
    assert OutTensor("x", torch.bfloat16, (3, 5)).nbytes == 30
    assert OutTensor("x", torch.float32, ()).nbytes == 4
    assert OutTensor("x", torch.int64, (0, 7)).nbytes == 0


TENSORS = {
    "model.embed.weight": torch.arange(12, dtype=torch.float32).view(3, 4),
    "model.scale": torch.tensor(2.5, dtype=torch.bfloat16),  # 0-d: shape []
    "model.ids": torch.arange(5, dtype=torch.int64),
    "model.empty": torch.zeros(0, 3, dtype=torch.float16),
    "model.odd": torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16),  # 6 bytes: misaligns
}


def specs(tensors: dict[str, torch.Tensor]) -> list[OutTensor]:
    return [OutTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_encoded_header_is_read_back_by_safetensors(tmp_path):
    header = encode_header(specs(TENSORS))
    length = int.from_bytes(header[:8], "little")
    assert len(header) == 8 + length and length % 8 == 0  # data starts 8-byte aligned
    assert header[8:].rstrip(b" ").endswith(b"}")  # padded with spaces only
    parsed = json.loads(header[8:])
    offsets = [parsed[k]["data_offsets"] for k in TENSORS]
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))  # contiguous
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + b"".join(raw(t) for t in TENSORS.values()))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(TENSORS)
    loaded = load_file(str(path))
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


def write(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int,
          done: frozenset[int] = frozenset()) -> list[tuple[str, int, int]]:
    """Stream `tensors` through a ShardedWriter; (file, size, crc) of each shard it reports."""
    reported = []
    w = ShardedWriter(folder, plan_shards(specs(tensors), max_bytes), done=done,
                      on_shard=lambda p, size, crc: reported.append((p.name, size, crc)))
    for name, t in tensors.items():
        if w.layout.shard_of[name] in done:
            w.skip_tensor(name)
            continue
        w.begin_tensor(name)
        data = raw(t)
        w.write(data[:3])  # in pieces, as chunks arrive
        w.write(data[3:])
    w.finish()
    return reported


def test_sharded_model_and_its_index(tmp_path):
    import zlib

    reported = write(tmp_path, TENSORS, 42)
    names = shard_names(3)
    assert [r[0] for r in reported] == names
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == names
    for name, size, crc in reported:
        data = (tmp_path / name).read_bytes()
        assert (len(data), zlib.crc32(data)) == (size, crc)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in specs(TENSORS))
    assert index["weight_map"] == {
        "model.embed.weight": names[0], "model.scale": names[1], "model.ids": names[1],
        "model.empty": names[1], "model.odd": names[2]}
    loaded = {}
    for name in names:
        loaded.update(load_file(str(tmp_path / name)))
    assert loaded.keys() == TENSORS.keys()
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_one_shard_has_no_index(tmp_path):
    write(tmp_path, TENSORS, 10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_finished_shards_are_neither_opened_nor_reported(tmp_path):
    reported = write(tmp_path, TENSORS, 42, done=frozenset({1}))
    assert [r[0] for r in reported] == [shard_names(3)[0], shard_names(3)[2]]
    assert not (tmp_path / shard_names(3)[1]).exists()


def test_writer_refuses_tensors_out_of_order_or_too_long(tmp_path):
    w = ShardedWriter(tmp_path, plan_shards(specs(TENSORS), 42))
    with pytest.raises(RuntimeError, match="expected model.embed.weight"):
        w.begin_tensor("model.scale")
    w.begin_tensor("model.embed.weight")
    with pytest.raises(RuntimeError, match="more bytes"):
        w.write(b"\0" * 49)


def test_written_bytes_go_to_disk_in_the_background(tmp_path, monkeypatch):
    """Every FLUSH_BYTES written (and at each shard's end) a flush of that shard's descriptor
    starts on another thread, unless one is still running; the shards are byte for byte what
    they would be without."""
    import os
    import threading

    import warpmerge.writer as writer

    flushed: list[tuple[int, str]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed.append((os.fstat(fd).st_size, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(writer, "FLUSH_BYTES", 16)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    write(tmp_path, TENSORS, 42)
    assert flushed
    assert all(name != threading.main_thread().name for _, name in flushed)
    loaded = {}
    for name in shard_names(3):
        loaded.update(load_file(str(tmp_path / name)))
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_a_failed_background_flush_fails_the_writer(tmp_path, monkeypatch):
    import os

    import warpmerge.writer as writer

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer, "FLUSH_BYTES", 16)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError, match="Input/output error"):
        write(tmp_path, TENSORS, 42)
