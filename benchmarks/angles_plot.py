"""What angles.png costs `warpmerge run`: the demo's merge in fresh processes, with the plot
and with it switched off, alternating; medians of the wall time of the whole process.

    PYTHONPATH=$PWD python benchmarks/angles_plot.py [repeats]

Measured 2026-12-03 on the shared 2-core machine (OMP_NUM_THREADS=1, 4 runs each): median
2.57 s without, 3.02 s with (ratio 1.18): about 0.45 s, constant (one figure per merge, and
matplotlib imported on a side thread during the merge), so it vanishes on real models.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warpmerge.demo import build_setup

RUN = """
import sys, warpmerge.api as api, warpmerge.metadata as metadata
if sys.argv[2] == "off":
    metadata._angles_png = lambda plan, provenance: None
    api._import_plotting_meanwhile = lambda: None
api.run(sys.argv[1], force=True)
"""


def main(repeats: int = 5) -> None:
    root = Path(tempfile.mkdtemp(prefix="warpmerge-bench-angles-"))
    config = build_setup(root)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", RUN, str(config), mode], check=True)
            times[mode].append(time.perf_counter() - t0)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"run without angles.png: median {off:.2f} s; with: {on:.2f} s; "
          f"ratio {on / off:.3f} ({repeats} alternating runs each)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
