"""What the planner needs to know about this machine: memory, cores, free disk space.

The one place that asks the operating system, so that planning stays a pure function of the
config, the inputs' headers and this snapshot (and tests can hand the planner any machine).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FreeSpace:
    """Free bytes on the disk that holds (or will hold) `path`."""

    path: Path  # the path asked about
    where: Path  # its closest existing folder, where the space was measured
    device: int  # st_dev of `where`: two paths on one disk share its free bytes
    free: int


@dataclass(frozen=True)
class Machine:
    """A snapshot of this machine, taken once before planning."""

    cpus: int  # threads the merge may use by default
    available_memory: int  # bytes
    space: tuple[FreeSpace, ...] = ()  # for the output folders and the Hub cache

    def free_at(self, path: Path) -> FreeSpace:
        for s in self.space:
            if s.path == path:
                return s
        raise KeyError(f"no free-space probe for {path}")


def probe_machine(paths: list[Path]) -> Machine:
    return Machine(default_threads(), available_memory(), tuple(free_space(p) for p in paths))


def default_threads() -> int:
    """torch's own count of the cores to use (physical cores, within the CPU affinity)."""
    import torch

    return torch.get_num_threads()


def available_memory() -> int:
    """MemAvailable from /proc/meminfo; 4 GiB where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 * 2**30


def free_space(path: Path) -> FreeSpace:
    where, free = free_bytes(path)
    return FreeSpace(Path(path), where, where.stat().st_dev, free)


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free space on the disk that holds `path`, or would once it is created."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free
