"""A float64 WARP reference, written from /work/shared/spec/warp.md and nothing else.

It shares no code with the engine (no `warpmerge` import): each formula of the spec is applied
to whole tensors in float64, the slow and obvious way, so that the benchmark can say how close
warpmerge's and mergekit's outputs are to the exact result. A SLERP group is one flat tensor:
to reference a group of several tensors, concatenate them flattened (`torch.cat`) and split the
result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ZERO_NORM = 1e-6  # a task vector at most this x ‖θ_init‖ (same group) counts as zero
MIN_SIN = 1e-6  # below this sin Ω, SLERP falls back to LERP


def ema_weights(steps: Sequence[int], mu: float, start: int = 0) -> list[float]:
    """a_t with EMA_T − θ_init = Σ_t a_t·(θ_t − θ_init), checkpoint t saved at steps[t].

    From the spec's recursion ema_t = (1 − μ_t)·ema_{t−1} + μ_t·θ_t with
    μ_t = 1 − (1 − μ)^(s_t − s_{t−1}): checkpoint t's weight is μ_t times the decay of every
    later update. Evenly spaced checkpoints are steps = every, 2·every, ...
    """
    rates, prev = [], start
    for s in steps:
        rates.append(1.0 - (1.0 - mu) ** (s - prev))
        prev = s
    weights = []
    for t, rate in enumerate(rates):
        w = rate
        for later in rates[t + 1:]:
            w *= 1.0 - later
        weights.append(w)
    return weights


def task_vector(init: torch.Tensor, checkpoints: Sequence[torch.Tensor],
                weights: Sequence[float]) -> torch.Tensor:
    """δ = Σ_t a_t·(θ_t − θ_init), differences first (an unchanged tensor gives exactly 0)."""
    init = init.double()
    delta = torch.zeros_like(init)
    for a, theta in zip(weights, checkpoints, strict=True):
        delta += a * (theta.double() - init)
    return delta


def slerp(r: torch.Tensor, d: torch.Tensor, lam: float, zero: float) -> torch.Tensor:
    """slerp(r, d; λ), or LERP where either is (numerically) zero or sin Ω < 1e-6."""
    nr, nd = float(r.norm()), float(d.norm())
    if nr <= zero or nd <= zero:
        return (1 - lam) * r + lam * d
    cos = max(-1.0, min(1.0, float((r * d).sum()) / (nr * nd)))
    omega = math.acos(cos)
    if math.sin(omega) < MIN_SIN:
        return (1 - lam) * r + lam * d
    return (math.sin((1 - lam) * omega) * r + math.sin(lam * omega) * d) / math.sin(omega)


def warp(init: torch.Tensor, runs: Sequence[Sequence[torch.Tensor]],
         run_weights: Sequence[Sequence[float]], eta: float) -> torch.Tensor:
    """θ_init + η·chainSLERP(δ_1, ..., δ_M) for one group, in float64 (equal run weights).

    `runs[m]` are run m's checkpoints of this group, `run_weights[m]` their EMA weights a_{m,t}.
    """
    init = init.double()
    zero = ZERO_NORM * float(init.norm())
    deltas = [task_vector(init, ckpts, a) for ckpts, a in zip(runs, run_weights, strict=True)]
    r = deltas[0]
    for m, d in enumerate(deltas[1:], start=2):
        r = slerp(r, d, 1.0 / m, zero)
    return init + eta * r


def lora_delta(a: torch.Tensor, b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """A LoRA module's ΔW = (lora_alpha / r)·B @ A, in float64 (plain LoRA, no rsLoRA)."""
    return (alpha / rank) * (b.double() @ a.double())
