"""Writing output folders: shards tensor by tensor, never buffering one, into staging folders.

The layout is decided by the plan (shards.py): a shard file is opened, its header written, and
tensor bytes appended in order as the engine produces them. A folder is built beside its target
and renamed into place only when complete and flushed to disk.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from .modelfolder import INDEX_FILE
from .shards import ShardLayout

ShardDone = Callable[[Path, int, int], None]  # (shard path, size, crc32) once it is on disk
FLUSH_BYTES = 64 << 20  # a shard's bytes are sent to disk in the background every this many


class WriteBehind:
    """Sends a file's written bytes to disk on a background thread while the merge goes on.

    Why: the commit must fsync every output byte before the rename. Left to the end, that
    fsync is a wait (1.4 s per GB written on the benchmark machine) in which nothing else
    happens; started as the bytes arrive, it overlaps the arithmetic, and the commit's fsync
    finds little left.

    At most one flush per file is in flight. It works on a duplicate descriptor, so the file
    may be closed meanwhile. A flush that fails is reported by `raise_error`, since a later
    fsync through another descriptor may not see the error again.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def kick(self, fd: int) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # the next kick covers what is written meanwhile
        dup = os.dup(fd)
        self._thread = threading.Thread(target=self._flush, args=(dup,), daemon=True)
        self._thread.start()

    def _flush(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as exc:
            self._error = exc
        finally:
            os.close(fd)

    def raise_error(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


class ShardedWriter:
    """Streams one model's tensors, in layout order, into its shard files inside `folder`.

    Shards listed in `done` (already on disk from an interrupted run, verified) are skipped:
    their tensors' bytes are accepted and dropped. `on_shard` hears of each finished shard
    with its CRC-32, computed while writing, for the resume journal.
    """

    def __init__(self, folder: Path, layout: ShardLayout, done: frozenset[int] = frozenset(),
                 on_shard: ShardDone | None = None) -> None:
        self.folder = folder
        self.layout = layout
        self.order = layout.tensors
        self.done = done
        self.on_shard = on_shard
        self._shard = -1
        self._file = None
        self._skip = False
        self._crc = 0
        self._size = 0
        self._next = 0  # index into self.order of the next tensor
        self._left = 0  # bytes still expected for the current one
        self._unflushed = 0
        self._behind = WriteBehind()

    def begin_tensor(self, name: str) -> None:
        expected = self.order[self._next]
        if name != expected.name or self._left:
            raise RuntimeError(f"writer expected {expected.name}, got {name}")
        shard = self.layout.shard_of[name]
        if shard != self._shard:
            self._close_file()
            self._shard = shard
            self._skip = shard in self.done
            if not self._skip:
                path = self.folder / self.layout.names[shard]
                self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - see _close_file
                self._crc, self._size = 0, 0
                self._put(memoryview(self.layout.header(shard)))
        self._left = expected.nbytes
        self._next += 1

    def skip_tensor(self, name: str) -> None:
        """Pass over a tensor that lies in a finished shard."""
        self.begin_tensor(name)
        if not self._skip:
            raise RuntimeError(f"{name} is not in a finished shard")
        self._left = 0

    def write(self, data: torch.Tensor | bytes | memoryview) -> None:
        """Append bytes of the current tensor (a contiguous tensor is written as its bytes)."""
        if isinstance(data, torch.Tensor):
            data = memoryview(data.view(torch.uint8).numpy()) if data.numel() else b""
        view = memoryview(data).cast("B")
        if view.nbytes > self._left:
            raise RuntimeError("writer got more bytes than the tensor holds")
        self._left -= view.nbytes
        if not self._skip:
            self._put(view)

    def _put(self, view: memoryview) -> None:
        self._crc = zlib.crc32(view, self._crc)
        self._size += view.nbytes
        self._unflushed += view.nbytes
        while view.nbytes:
            view = view[self._file.write(view):]
        if self._unflushed >= FLUSH_BYTES:
            self._behind.kick(self._file.fileno())
            self._unflushed = 0

    def _close_file(self) -> None:
        if self._file is not None:  # on disk by the commit's fsync; --resume re-verifies CRCs
            self._behind.kick(self._file.fileno())
            self._file.close()
            self._file = None
            if self.on_shard is not None:
                self.on_shard(self.folder / self.layout.names[self._shard], self._size,
                              self._crc)

    def finish(self) -> None:
        if self._next != len(self.order) or self._left:
            raise RuntimeError("writer closed before every tensor was written")
        self._close_file()
        self._behind.raise_error()
        index = self.layout.index()
        if index is not None:
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves, deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _sync(Path(root, name))
        _sync(Path(root))


class Staging:
    """Builds an output folder beside its target and renames it into place only when complete.

    A run killed at any moment leaves either nothing or a `.NAME.warpmerge-partial` folder,
    which the next run clears; nothing half-written ever carries the final name.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.warpmerge-partial"

    def create(self, keep: bool = False) -> Path:
        """An empty staging folder; with `keep`, what an interrupted run left is kept."""
        import shutil

        if self.path.exists() and not keep:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def sync(self) -> None:
        """Flush every file and folder written so far (commit flushes again what came since)."""
        _sync_tree(self.path)

    def commit(self) -> None:
        """Swap the finished folder in; an existing target (with --force) is replaced.

        Every file and folder is flushed to disk first, so that after a power cut the final
        name holds the whole model or is not there: without the flushes a filesystem may
        persist the rename before the data and leave empty shards under the final name.
        """
        import shutil

        _sync_tree(self.path)
        old = self.target.parent / f".{self.target.name}.warpmerge-old"
        if self.target.exists():
            if old.exists():
                shutil.rmtree(old)
            self.target.rename(old)
        self.path.rename(self.target)
        _sync(self.target.parent)
        if old.exists():
            shutil.rmtree(old)

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
