"""Micro-benchmarks of the merge's arithmetic and reading, as ratios measured in one run.

  merge   warpmerge.run on a bench_merge.py setup, timed in-process (imports excluded), for
          several code trees alternated (PYTHONPATH=tree), medians and ratios to the first;
  kernel  CPU seconds per GB of input: a plain read of the same bytes, the kernel's pass 1
          and pass 2 per chunk, single-threaded.

The machine may be shared: every figure is a median of alternating runs, and the ratios are
what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MERGE_SCRIPT = r"""
import json, sys, time
c0 = time.process_time()
import warpmerge, warpmerge.engine, torch
imports = time.process_time() - c0
try:  # the compiled loops: load them (numba's start-up) outside the merge's time
    import numpy as np
    from warpmerge import fused
    u, f, i = np.zeros((2, 8), np.uint16), np.zeros((2, 8), np.float32), np.zeros(2, np.int64)
    b = np.zeros(fused.SUB, np.uint32)
    fused.task_vectors(u, i, np.zeros(2, np.float32), np.zeros(2, np.int64), 8, f, 0,
                       np.zeros((2, 1)), 8, b, b.view(np.float32))
    t = np.zeros(fused.SUB, np.float32)
    fused.outputs(f, 0, np.zeros(1, np.float32), np.zeros(1, np.float32), 8, u, f,
                  np.zeros(0, np.int64), 0, t, t.copy(), t.view(np.uint32))
except ImportError:
    pass
startup = time.process_time() - c0
cfg, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = json.loads(sys.argv[4])
t1 = time.perf_counter(); c1 = time.process_time()
warpmerge.run(cfg, out=out, force=True, quiet=True, threads=threads, **extra)
print(json.dumps({"cpu": time.process_time() - c1, "wall": time.perf_counter() - t1,
                  "imports": imports, "startup": startup}))
"""


def run_merge(python: str, tree: Path, cfg: Path, out: Path, threads: int,
              extra: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([python, "-c", MERGE_SCRIPT, str(cfg), str(out), str(threads),
                          json.dumps(extra)], env=env, capture_output=True, text=True, cwd=tree)
    if res.returncode:
        raise SystemExit(f"{tree}: {res.stderr.strip().splitlines()[-1]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    times = json.loads(res.stdout.strip().splitlines()[-1])
    times["process_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    times["process_wall"] = time.perf_counter() - t0
    return times


def merge(args: argparse.Namespace) -> None:
    trees = [Path(t).resolve() for t in args.trees]
    extra = json.loads(args.extra)
    threads = [int(t) for t in args.threads.split(",")]
    variants = [(tree, n) for tree in trees for n in threads]
    results: dict[tuple[Path, int], list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for tree, n in order:
            results[(tree, n)].append(run_merge(args.python, tree, args.config, args.out, n,
                                                extra))
    base = None
    for tree, n in variants:
        runs = results[(tree, n)]
        cpu = statistics.median(x["cpu"] for x in runs)
        wall = statistics.median(x["wall"] for x in runs)
        total = statistics.median(x["process_cpu"] for x in runs)
        imports = statistics.median(x["imports"] for x in runs)
        startup = statistics.median(x["startup"] for x in runs)
        base = base or (cpu, wall, total)
        print(f"{tree} --threads {n}: merge cpu {cpu:.2f} s ({cpu / base[0]:.2f}x), "
              f"wall {wall:.2f} s ({wall / base[1]:.2f}x); whole process cpu {total:.2f} s "
              f"({total / base[2]:.2f}x); imports cpu {imports:.2f} s, with the compiled "
              f"loops loaded {startup:.2f} s; merge cpu, wall of each run "
              f"{[(round(x['cpu'], 2), round(x['wall'], 2)) for x in runs]}")


def accuracy(args: argparse.Namespace) -> None:
    """Both outputs against the float64 reference of bench_merge.py (its `agreement`)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_merge

    setup = bench_merge.make_setup(args.size)
    root = bench_merge.ensure_setup(setup, args.workdir)
    stats = bench_merge.agreement(setup, root, args.new, args.old)
    print(f"{stats['elements']} elements; off the correctly rounded result: "
          f"new {stats['wm_vs_ref_differ']} (max {stats['wm_vs_ref_max_ulp']:.4f} ulp), "
          f"old {stats['mk_vs_ref_differ']} (max {stats['mk_vs_ref_max_ulp']:.4f} ulp); "
          f"new and old differ in {stats['differ']}")


# --- the numba prototype of a fused kernel (commit 6de0668 wired it into the engine) --------
# Built only by the `kernel` subcommand, in an environment that has numba. Arithmetic: float32
# element by element, no FMA; inner products in float64 per sub-block (reassociated inside).

PROTOTYPE = r'''
import numpy as np
from numba import njit, types
from numba.extending import overload

SUB = 2048  # elements per sub-block: its float32 vectors fit the L1 cache
_BF16_NAN = np.uint16(0x7FC0)


def _as_f32(src: np.ndarray, lo: int, n: int, bits: np.ndarray,
            floats: np.ndarray) -> np.ndarray:
    """Elements [lo, lo+n) of an input row as float32 (bf16 rows are uint16 bits).

    `floats` views the same memory as `bits`, made by the caller: a view made inside
    compiled code would lose its known contiguity (and with it, vectorization).
    """
    raise NotImplementedError  # compiled only: see the overload below


@overload(_as_f32)
def _as_f32_impl(src, lo, n, bits, floats):  # noqa: ANN001, ANN202 - numba typing hook
    if src.dtype == types.uint16:
        def from_bf16(src, lo, n, bits, floats):  # noqa: ANN001, ANN202
            row = src[lo:lo + n]  # indexed from 0: no wraparound test (it blocks vectors)
            for i in range(n):
                bits[i] = np.uint32(row[i]) << np.uint32(16)
            return floats[:n]
        return from_bf16

    def as_is(src, lo, n, bits, floats):  # noqa: ANN001, ANN202, ARG001
        return src[lo:lo + n]
    return as_is


@njit(nogil=True, fastmath={"reassoc"})
def _dot64(a: np.ndarray, b: np.ndarray) -> float:
    s = 0.0
    for i in range(a.shape[0]):
        s += np.float64(a[i]) * np.float64(b[i])
    return s


@njit(nogil=True)
def _run_delta(x0: np.ndarray, raw: np.ndarray, lo: int, n: int, rows: np.ndarray,
               coefs: np.ndarray, d: np.ndarray, bits: np.ndarray,
               floats: np.ndarray) -> None:
    """d = Σ_t a_t·(θ_t − θ_init) over one run's rows: first (θ − θ_init)·a (no product
    when a = 1), then d + a·(θ − θ_init) for each next checkpoint, in order."""
    for t in range(rows.shape[0]):
        x = _as_f32(raw[rows[t]], lo, n, bits, floats)
        a = coefs[t]
        if t == 0:
            if a == np.float32(1.0):
                for i in range(n):
                    d[i] = x[i] - x0[i]
            else:
                for i in range(n):
                    d[i] = (x[i] - x0[i]) * a
        else:
            for i in range(n):
                d[i] = d[i] + a * (x[i] - x0[i])


@njit(nogil=True)
def task_vectors(raw: np.ndarray, rows: np.ndarray, coefs: np.ndarray, starts: np.ndarray,
                 n: int, vecs: np.ndarray, off: int, sums: np.ndarray, block: int,
                 bits: np.ndarray, floats: np.ndarray) -> None:
    """θ_init (raw row 0) into vecs[0] and δ_m into vecs[m], at [off, off+n).

    Run m's checkpoints are the raw rows rows[starts[m-1]:starts[m]], with EMA weights
    coefs[...] (zero weights left out). When `sums` has columns, it receives per BLOCK of
    the chunk ⟨δ_i, δ_j⟩ for i ≤ j (row by row), then ‖θ_init‖² in its last row.
    """
    M = vecs.shape[0] - 1
    init = vecs[0]
    for lo in range(0, n, SUB):
        k = min(SUB, n - lo)
        a, b = off + lo, off + lo + k
        x0 = _as_f32(raw[0], lo, k, bits, floats)
        dst0 = init[a:b]
        for i in range(k):
            dst0[i] = x0[i]
        for m in range(M):
            s, e = starts[m], starts[m + 1]
            row = vecs[m + 1]
            _run_delta(dst0, raw, lo, k, rows[s:e], coefs[s:e], row[a:b], bits,
                       floats)
        if sums.shape[1]:
            col = lo // block
            p = 0
            for i in range(1, M + 1):
                di = vecs[i]
                for j in range(i, M + 1):
                    dj = vecs[j]
                    sums[p, col] += _dot64(di[a:b], dj[a:b])
                    p += 1
            sums[p, col] += _dot64(dst0, dst0)


@njit(nogil=True)
def ema_delta(raw: np.ndarray, rows: np.ndarray, coefs: np.ndarray, n: int,
              vecs: np.ndarray, off: int, d: np.ndarray, bits: np.ndarray,
              floats: np.ndarray) -> None:
    """One run's δ with other EMA weights (`save` of a `use: last` merge), into d[:n]."""
    init = vecs[0]
    for lo in range(0, n, SUB):
        k = min(SUB, n - lo)
        _run_delta(init[off + lo:off + lo + k], raw, lo, k, rows, coefs, d[lo:lo + k], bits,
                   floats)


def _store(x: np.ndarray, u: np.ndarray, out: np.ndarray, lo: int) -> None:
    """x into out[lo:], rounded to out's dtype (uint16: bf16 bits, round to nearest even,
    as torch does); `u` views x's memory as uint32."""
    raise NotImplementedError  # compiled only: see the overload below


@overload(_store)
def _store_impl(x, u, out, lo):  # noqa: ANN001, ANN202 - numba typing hook
    if out.dtype == types.uint16:
        def to_bf16(x, u, out, lo):  # noqa: ANN001, ANN202
            dst = out[lo:lo + x.shape[0]]
            for i in range(x.shape[0]):
                r = (u[i] + np.uint32(0x7FFF) + ((u[i] >> np.uint32(16)) & np.uint32(1))) \
                    >> np.uint32(16)
                dst[i] = np.uint16(r) if x[i] == x[i] else _BF16_NAN
        return to_bf16

    def as_is(x, u, out, lo):  # noqa: ANN001, ANN202, ARG001
        dst = out[lo:lo + x.shape[0]]
        for i in range(x.shape[0]):
            dst[i] = x[i]
    return as_is


@njit(nogil=True)
def outputs(vecs: np.ndarray, off: int, chain: np.ndarray, etas: np.ndarray, n: int,
            outs: np.ndarray, emas: np.ndarray, ema_rows: np.ndarray, ema_off: int,
            merged: np.ndarray, tmp: np.ndarray, tmp_bits: np.ndarray) -> float:
    """outs[k] = θ_init + η_k·r with r = c_1·δ_1 + c_2·δ_2 + … (in that order), then
    outs[len(etas) + m] = θ_init + δ'_m, each saved EMA's δ'_m being emas[ema_rows[m]] at
    [ema_off, ema_off+n). θ_init and δ_m are vecs' rows at [off, off+n). Returns
    Σ r + Σ θ_init: finite unless an input holds a NaN or an Inf (or the sum overflows)."""
    M = vecs.shape[0] - 1
    E = etas.shape[0]
    init = vecs[0]
    check = np.float32(0.0)
    for lo in range(0, n, SUB):
        k = min(SUB, n - lo)
        a, b = off + lo, off + lo + k
        x0 = init[a:b]
        r = merged[:k]
        d = vecs[1][a:b]
        c = chain[0]
        for i in range(k):
            r[i] = d[i] * c
        for m in range(1, M):
            d = vecs[m + 1][a:b]
            c = chain[m]
            for i in range(k):
                r[i] = r[i] + c * d[i]
        check += _sum32(r) + _sum32(x0)
        t, u = tmp[:k], tmp_bits[:k]
        for e in range(E):
            eta = etas[e]
            for i in range(k):
                t[i] = x0[i] + eta * r[i]
            _store(t, u, outs[e], lo)
        for m in range(ema_rows.shape[0]):
            d = emas[ema_rows[m]][ema_off + lo:ema_off + lo + k]
            for i in range(k):
                t[i] = x0[i] + d[i]
            _store(t, u, outs[E + m], lo)
    return check


@njit(nogil=True, fastmath={"reassoc"})
def _sum32(x: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i]
    return s
'''


def kernel(args: argparse.Namespace) -> None:
    """CPU ns per input element, single-threaded, one chunk of bf16 rows already in memory:
    a plain copy of the bytes, today's torch arithmetic, the numba prototype."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    n, runs, ckpts = args.chunk, 2, 3
    rows = 1 + runs * ckpts
    t0 = time.perf_counter()
    loops: dict = {}
    exec(PROTOTYPE, loops)  # noqa: S102 - our own source, above
    import_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((rows, n), dtype=np.float32)).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().view(np.uint16)
    a = 0.3
    # today's arithmetic (warpmerge.kernel), on torch tensors
    x0, tmp, merged, d = torch.empty(n), torch.empty(n), torch.empty(n), torch.empty(runs, n)
    out = torch.empty(n, dtype=torch.bfloat16)

    def torch_pass1() -> None:
        x0.copy_(x[0])
        for m in range(runs):
            for t in range(ckpts):
                target = d[m] if t == 0 else tmp
                target.copy_(x[1 + ckpts * m + t])
                target.sub_(x0)
                if t == 0:
                    target.mul_(a)
                else:
                    d[m].add_(tmp, alpha=a)
        for s in range(0, n, 1 << 16):
            for i, j in [(0, 0), (0, 1), (1, 1)]:
                torch.dot(d[i][s:s + 65536], d[j][s:s + 65536]).item()
            torch.dot(x0[s:s + 65536], x0[s:s + 65536]).item()

    def torch_pass2() -> None:
        torch.mul(d[0], 0.6, out=merged)
        merged.add_(d[1], alpha=0.5)
        torch.add(x0, merged, alpha=0.3, out=tmp)
        out.copy_(tmp)

    sub = loops["SUB"]
    bits = np.empty(sub, np.uint32)
    vecs = np.empty((runs + 1, n), np.float32)
    sums = np.zeros((runs * (runs + 1) // 2 + 1, -(-n // 65536)))
    rws = np.arange(1, rows, dtype=np.int64)
    coefs = np.full(rows - 1, a, np.float32)
    starts = np.arange(0, rows, ckpts, dtype=np.int64)
    outs = np.empty((1, n), np.uint16)
    m_buf, t_buf = np.empty(sub, np.float32), np.empty(sub, np.float32)
    chain, etas, no_rows = np.array([0.6, 0.5], np.float32), np.array([0.3], np.float32), \
        np.zeros(0, np.int64)

    def numba_pass1() -> None:
        loops["task_vectors"](raw, rws, coefs, starts, n, vecs, 0, sums, 65536, bits,
                              bits.view(np.float32))

    def numba_pass2() -> None:
        loops["outputs"](vecs, 0, chain, etas, n, outs, vecs, no_rows, 0, m_buf, t_buf,
                         t_buf.view(np.uint32))

    t0 = time.perf_counter()
    numba_pass1()
    numba_pass2()
    first_call_s = time.perf_counter() - t0
    copy = np.empty_like(raw)

    def plain() -> None:
        np.copyto(copy, raw)

    timings: dict[str, list[float]] = {k: [] for k in ("plain", "t1", "n1", "t2", "n2")}
    fns = {"plain": plain, "t1": torch_pass1, "n1": numba_pass1, "t2": torch_pass2,
           "n2": numba_pass2}
    for _ in range(args.repeats):
        for k, fn in fns.items():  # alternating
            c = time.process_time()
            fn()
            timings[k].append(time.process_time() - c)
    per_in = {k: statistics.median(v) * 1e9 / (n * rows) for k, v in timings.items()}
    per_out = {k: statistics.median(v) * 1e9 / n for k, v in timings.items()}
    print(f"numba import + loading (or compiling) the loops: {import_s:.2f} s + "
          f"{first_call_s:.2f} s")
    print(f"plain copy of the bytes: {per_in['plain']:.3f} ns per input element")
    print(f"pass 1 (task vectors, Gram sums): torch {per_in['t1']:.3f}, numba "
          f"{per_in['n1']:.3f} ns per input element ({per_in['t1'] / per_in['n1']:.2f}x)")
    print(f"pass 2 (two runs, one eta, bf16 out): torch {per_out['t2']:.3f}, numba "
          f"{per_out['n2']:.3f} ns per output element ({per_out['t2'] / per_out['n2']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="time warpmerge.run for several code trees, alternating")
    m.add_argument("config", type=Path)
    m.add_argument("trees", nargs="+", help="code trees (folders holding warpmerge/)")
    m.add_argument("--out", type=Path, default=Path("/tmp/bench-kernel-out"))
    m.add_argument("--threads", default="1", help="thread counts to alternate, e.g. 1,2")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--python", default=sys.executable, help="interpreter to run them with")
    m.add_argument("--extra", default="{}", help="more keyword arguments of warpmerge.run (JSON)")
    m.set_defaults(fn=merge)
    a = sub.add_parser("accuracy", help="two outputs (tensor groups, bench_merge.py setup) "
                       "against the float64 reference")
    a.add_argument("new", type=Path)
    a.add_argument("old", type=Path)
    a.add_argument("--size", default="default")
    a.add_argument("--workdir", type=Path, default=Path("/tmp/warpmerge-bench"))
    a.set_defaults(fn=accuracy)
    k = sub.add_parser("kernel", help="per-chunk arithmetic: plain copy, torch, numba prototype")
    k.add_argument("--chunk", type=int, default=1 << 18)
    k.add_argument("--repeats", type=int, default=200)
    k.set_defaults(fn=kernel)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
