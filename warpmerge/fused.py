"""The merge's inner loops, compiled (numba): each input byte is touched once per pass.

Unfused array ops make a dozen passes over every element (convert, subtract, scale, add, dot,
convert back), each through memory. These loops walk a chunk in sub-blocks of SUB elements
that stay in the L1 cache: an input's bf16 bits become float32 there, and every intermediate
(θ_init, task vectors, the merged update) lives there between the few vectorized loops that
use it.

Arithmetic is float32, element by element, in the order the docstrings give, with no
contraction into FMAs: an element's result never depends on where its chunk starts. Inner
products are accumulated in float64 (exact products of float32 values) per sub-block, with
reassociation allowed only inside that sum; sub-block sums are added in order into the
BLOCK-element partial sums the engine combines, so neither chunk size nor thread count changes
a bit. (The lane order of that reassociated sum follows the CPU's vector width, as a BLAS dot
product's does.)

Compiled functions are cached on disk (numba's cache), so only the first run on a machine pays
the compilation.
"""

from __future__ import annotations

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


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _dot64(a: np.ndarray, b: np.ndarray) -> float:
    s = 0.0
    for i in range(a.shape[0]):
        s += np.float64(a[i]) * np.float64(b[i])
    return s


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum32(x: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i]
    return s
