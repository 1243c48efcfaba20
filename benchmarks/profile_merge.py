#!/usr/bin/env python
"""Where warpmerge's time goes: CPU seconds of its imports and of the merge, in one process.

bench_merge.py times whole commands against baselines; this script opens one up. For each
--threads setting and SLERP granularity it runs, in a fresh process, `import torch`, the rest
of what `warpmerge run` imports, and the merge itself (`warpmerge.api.run`), and prints the
median CPU time of each part (and the merge's wall time). With --torch-profile it also prints
torch's operator table for one `--threads 1` merge.

    python benchmarks/profile_merge.py                    # the default setup, 3 repeats
    python benchmarks/profile_merge.py --size large --repeats 2 --torch-profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if (REPO / "warpmerge" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # profile this checkout, whatever else is pip-installed

import measure  # noqa: E402  (benchmarks/, on sys.path as the script's folder)
from bench_merge import write_configs  # noqa: E402
from measure import BenchError, clear, sub_env  # noqa: E402
from setups import SIZES, ensure_setup, make_setup  # noqa: E402

BREAKDOWN_SCRIPT = r"""
import json, sys, time
cfg, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
c0, w0 = time.process_time(), time.perf_counter()
import torch
c1 = time.process_time()
import warpmerge.cli
from warpmerge.api import run
import warpmerge.engine, warpmerge.config
c2, w2 = time.process_time(), time.perf_counter()
run(cfg, out=out, force=True, quiet=True, threads=threads)
c3, w3 = time.process_time(), time.perf_counter()
print(json.dumps({"import_torch": c1 - c0, "other_imports": c2 - c1, "merge_cpu": c3 - c2,
                  "merge_wall": w3 - w2, "file": warpmerge.__file__}))
"""

# torch's operator profile of one merge (single-threaded, so every op is on the main thread)
TORCH_PROFILE_SCRIPT = r"""
import sys
import torch
from torch.profiler import ProfilerActivity, profile
from warpmerge.api import run
with profile(activities=[ProfilerActivity.CPU]) as prof:
    run(sys.argv[1], out=sys.argv[2], force=True, quiet=True, threads=1)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
"""


def breakdown(size: str, workdir: Path, repeats: int, python: str) -> dict[str, dict]:
    """Median CPU time of warpmerge's imports and of its merge, per --threads and granularity."""
    setup = make_setup(size)
    root = ensure_setup(setup, workdir)
    paths = write_configs(setup, root, workdir / "configs" / size, "float32")
    out = workdir / "out" / f"{size}-breakdown"
    rows: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for threads in (1, 0):
            for gran in ("tensor", "layer"):
                clear(out)
                proc = subprocess.run(
                    [python, "-c", BREAKDOWN_SCRIPT, str(paths[f"wm-{gran}"]), str(out),
                     str(threads)], capture_output=True, text=True, env=sub_env(None),
                    timeout=measure.TIMEOUT_S)
                if proc.returncode:
                    raise BenchError(f"breakdown failed: {proc.stderr.strip()[-500:]}")
                key = f"{gran}, threads {threads or 'default'}"
                rows.setdefault(key, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    clear(out)
    return {key: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "file"}
            for key, rs in rows.items()}


def torch_profile(size: str, workdir: Path, python: str) -> str:
    setup = make_setup(size)
    root = ensure_setup(setup, workdir)
    paths = write_configs(setup, root, workdir / "configs" / size, "float32")
    out = workdir / "out" / f"{size}-profile"
    clear(out)
    proc = subprocess.run([python, "-c", TORCH_PROFILE_SCRIPT, str(paths["wm-tensor"]), str(out)],
                          capture_output=True, text=True, env=sub_env(None),
                          timeout=measure.TIMEOUT_S)
    clear(out)
    if proc.returncode:
        raise BenchError(f"torch profile failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=list(SIZES), help="the setup to merge")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (median taken)")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "warpmerge-bench",
                   help="setups (shared with bench_merge.py) and outputs")
    p.add_argument("--torch-profile", action="store_true",
                   help="also print torch's operator table for one --threads 1 merge")
    p.add_argument("--python", default=sys.executable, help="interpreter for warpmerge")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        report = breakdown(args.size, workdir, args.repeats, args.python)
        print(f"where warpmerge's time goes ({args.size}, median of {args.repeats})")
        for key, med in report.items():
            print(f"  {key:<28} import torch {med['import_torch']:5.2f} s cpu, other imports "
                  f"{med['other_imports']:5.2f} s, merge {med['merge_cpu']:5.2f} s cpu "
                  f"({med['merge_wall']:5.2f} s wall)")
        if args.torch_profile:
            print(torch_profile(args.size, workdir, args.python))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
