"""Running a command and measuring it: wall time, CPU time, and peak anonymous memory.

Each command is a subprocess; wall time is taken around it, CPU time (user + system) from
getrusage(RUSAGE_CHILDREN), and the peak anonymous RSS of it and its children sampled every
10 ms (file-backed pages, such as mmapped inputs, are not counted).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.01  # RssAnon sampling interval
RESCAN_EVERY = 5  # look for new child processes every this many samples
TIMEOUT_S = 900.0  # per command; a merge running longer is taken for a hang (--timeout)


class BenchError(RuntimeError):
    pass


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Samples the summed RssAnon of a process tree every 10 ms; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids, i = [self.pid], 0
        while not self._stop_event.is_set():
            if i % RESCAN_EVERY == 0:
                pids = _descendants(self.pid)
            self.peak = max(self.peak, sum(_rss_anon(p) for p in pids))
            i += 1
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


@dataclass
class Measure:
    seconds: float  # wall time
    peak: int  # peak anonymous RSS (sampled)
    cpu: float = 0.0  # user + system CPU seconds of the process and its children
    load: float = 0.0  # the 1-minute load average when it ended (other jobs on the machine)
    stages: list[float] = field(default_factory=list)


def run_measured(stages: list[list[str]], log: Path, env: dict[str, str]) -> Measure:
    """Run the commands one after the other; total wall time, the highest peak of any."""
    total, peak, cpu, times = 0.0, 0, 0.0, []
    with open(log, "ab") as logf:
        for cmd in stages:
            logf.write(f"\n$ {' '.join(cmd)}\n".encode())
            logf.flush()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env)
            sampler = PeakSampler(proc.pid)
            sampler.start()
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                sampler.stop()
                raise BenchError(f"{' '.join(cmd[:4])} ... ran past {TIMEOUT_S} s (a hang?); "
                                 f"killed; see {log}") from None
            dt = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            peak = max(peak, sampler.stop())
            if rc != 0:
                raise BenchError(f"{Path(cmd[0]).name} exited with {rc}; see {log}")
            times.append(dt)
            total += dt
    return Measure(total, peak, cpu, os.getloadavg()[0], times)


def sub_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if str(REPO) in sys.path:  # `python -m warpmerge` runs this checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    inter = path.parent / (path.name + "-intermediate")
    if inter.exists():
        shutil.rmtree(inter)


def drop_caches(folders: list[Path]) -> str:
    """Evict the inputs from the page cache, so that the next command reads them from disk.

    As root, `sync` and `echo 3 > /proc/sys/vm/drop_caches` (everything). Otherwise each file
    under `folders` is advised out with posix_fadvise(DONTNEED), which drops its clean pages
    and needs no privilege. Returns which way was used.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for folder in folders:
        for path in folder.rglob("*.safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def alternate(methods: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, method) in an order that rotates the methods from one repeat to the next."""
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            yield r, m


def summarize(results: dict[str, list[Measure]]) -> dict[str, dict]:
    return {m: {
        "seconds": statistics.median(x.seconds for x in rs),
        "seconds_all": [round(x.seconds, 3) for x in rs],
        "seconds_min": min(x.seconds for x in rs),
        "cpu_all": [round(x.cpu, 3) for x in rs],
        "cpu": statistics.median(x.cpu for x in rs),
        "load": [round(x.load, 2) for x in rs],
        "peak_anon": statistics.median(x.peak for x in rs),
        "peak_anon_max": max(x.peak for x in rs),
        "stages": [statistics.median(x.stages[i] for x in rs) for i in range(len(rs[0].stages))],
    } for m, rs in results.items() if rs}
