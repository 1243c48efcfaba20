"""The WARP math: pure functions on numbers and tensors, knowing nothing of files.

Two layers. The coefficient functions (`ema_coefficients`, `chain_coefficients`) turn the config
and a group's Gram matrix into a handful of float64 scalars: every stage of WARP is linear in the
inputs once those scalars are known, which is what lets the engine stream. The tensor functions
(`ema`, `slerp`, `liti`) are the public, whole-tensor form of the same math, for users and tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ZERO_RELATIVE_NORM = 1e-6  # a task vector this small relative to θ_init counts as zero
MIN_SIN_OMEGA = 1e-6  # below this the SLERP is numerically a LERP


def effective_mu(mu: float, every: int) -> float:
    """EMA rate per checkpoint when checkpoints are `every` optimizer steps apart."""
    return 1.0 - (1.0 - mu) ** every


def ema_coefficients(
    n_checkpoints: int,
    mu: float,
    every: int = 1,
    start: str = "init",
    use: str = "ema",
    steps: Sequence[int] | None = None,
) -> list[float]:
    """Scalars a_t with P − θ_init = Σ_t a_t·(θ_t − θ_init), for one run.

    Unrolling ema_t = (1 − μe_t)·ema_{t−1} + μe_t·θ_t from ema_0 = θ_init gives
    a_t = μe_t·Π_{k>t}(1 − μe_k); with `start: first`, ema_1 = θ_1 and a_1 = Π_{k>1}(1 − μe_k).
    `steps` are the checkpoints' optimizer steps s_t (θ_init is step 0), so that
    μe_t = 1 − (1 − μ)^(s_t − s_{t−1}); without them s_t = t·every. When every gap that counts
    is the same, this is the closed form a_t = μe·(1 − μe)^(T − t) with that gap, so real steps
    that are evenly spaced give bit for bit what a constant `every` gives.
    """
    if n_checkpoints < 1:
        raise ValueError("a run needs at least one checkpoint")
    if steps is not None and len(steps) != n_checkpoints:
        raise ValueError("give one step per checkpoint")
    if n_checkpoints == 1 or use == "last":
        return [0.0] * (n_checkpoints - 1) + [1.0]
    T = n_checkpoints
    steps = [t * every for t in range(1, T + 1)] if steps is None else list(steps)
    gaps = step_gaps(steps)
    counted = gaps[1:] if start == "first" else gaps  # `first`: the EMA starts at s_1
    if len(set(counted)) == 1:
        mu_e = effective_mu(mu, counted[0])
        coefs = [mu_e * (1.0 - mu_e) ** (T - t) for t in range(1, T + 1)]
        if start == "first":
            coefs[0] = (1.0 - mu_e) ** (T - 1)
        return coefs
    # Π_{k>t}(1 − μe_k) = (1 − μ)^(s_T − s_t): one power, no 1 − (1 − x) cancellation
    kept = [(1.0 - mu) ** (steps[-1] - s) for s in steps]
    coefs = [effective_mu(mu, g) * k for g, k in zip(gaps, kept, strict=True)]
    if start == "first":
        coefs[0] = kept[0]
    return coefs


def step_gaps(steps: Sequence[int]) -> list[int]:
    """s_t − s_{t−1} with s_0 = 0 (θ_init); the steps must strictly increase from 1."""
    gaps = [b - a for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    if any(g < 1 for g in gaps):
        raise ValueError(f"steps must strictly increase from 1 (got {list(steps)})")
    return gaps


@dataclass(frozen=True)
class ChainStep:
    """One SLERP of the chain, kept for provenance: which run, λ, the angle and the mode."""

    run: int
    lam: float
    cos_omega: float | None  # None when a task vector was zero
    mode: str  # "slerp" | "lerp"


def chain_lambdas(weights: Sequence[float], lam: float | None = None) -> list[float]:
    """λ_m = w_m / (w_1 + … + w_m) for m = 2..M; an explicit λ overrides for two runs."""
    if lam is not None:
        if len(weights) != 2:
            raise ValueError("an explicit lambda needs exactly two task vectors")
        return [lam]
    total = weights[0]
    out = []
    for w in weights[1:]:
        total += w
        out.append(w / total)
    return out


def chain_coefficients(
    gram: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
    lam: float | None = None,
    init_sq_norm: float = 0.0,
) -> tuple[list[float], list[ChainStep]]:
    """Coefficients c with chain-SLERP(δ_1..δ_M) = Σ_m c_m·δ_m, from the Gram matrix alone.

    Every norm and inner product in the chain is bilinear, so r = Σ c_m δ_m gives
    ‖r‖² = cᵀGc and ⟨r, δ_m⟩ = (Gc)_m. A vector whose norm is at most 1e-6·‖θ_init‖ (or
    exactly zero) counts as zero, and then the step is a LERP (the spec's decision).
    """
    M = len(gram)
    weights = list(weights) if weights is not None else [1.0] * M
    threshold_sq = (ZERO_RELATIVE_NORM**2) * init_sq_norm
    c = [0.0] * M
    c[0] = 1.0
    steps: list[ChainStep] = []
    for m, lam_m in enumerate(chain_lambdas(weights, lam), start=1):
        g_c = [sum(gram[i][j] * c[j] for j in range(M)) for i in range(M)]
        r_sq = max(sum(c[i] * g_c[i] for i in range(M)), 0.0)
        d_sq = max(gram[m][m], 0.0)
        cos = None
        mode = "lerp"
        if r_sq > threshold_sq and d_sq > threshold_sq and r_sq > 0 and d_sq > 0:
            cos = max(-1.0, min(1.0, g_c[m] / math.sqrt(r_sq * d_sq)))
            omega = math.acos(cos)
            sin_omega = math.sin(omega)
            if sin_omega >= MIN_SIN_OMEGA:
                mode = "slerp"
                a = math.sin((1.0 - lam_m) * omega) / sin_omega
                b = math.sin(lam_m * omega) / sin_omega
        if mode == "lerp":
            a, b = 1.0 - lam_m, lam_m
        c = [a * ci for ci in c]
        c[m] += b
        steps.append(ChainStep(run=m, lam=lam_m, cos_omega=cos, mode=mode))
    return c, steps


# --- whole-tensor forms (public API) ------------------------------------------------------

Group = torch.Tensor | Mapping[str, torch.Tensor]


def ema(
    checkpoints: Sequence[torch.Tensor],
    init: torch.Tensor,
    mu: float = 0.01,
    every: int = 1,
    start: str = "init",
) -> torch.Tensor:
    """The EMA of a run's checkpoints (oldest first), computed as θ_init + Σ a_t·(θ_t − θ_init).

    Written as differences so that a tensor the run never changed comes back exactly as θ_init.
    """
    coefs = ema_coefficients(len(checkpoints), mu, every, start)
    base = init.double()
    delta = torch.zeros_like(base)
    for a, ckpt in zip(coefs, checkpoints, strict=True):
        delta += a * (ckpt.double() - base)
    return (base + delta).to(init.dtype)


def _flat(group: Group) -> list[torch.Tensor]:
    if isinstance(group, torch.Tensor):
        return [group]
    return [group[k] for k in sorted(group)]


def _dot(x: Group, y: Group) -> float:
    pairs = zip(_flat(x), _flat(y), strict=True)
    return float(sum((a.double() * b.double()).sum() for a, b in pairs))


def slerp(
    deltas: Sequence[Group],
    weights: Sequence[float] | None = None,
    lam: float | None = None,
    init: Group | None = None,
) -> Group:
    """Chain SLERP of the task vectors δ_1..δ_M of one group (a tensor, or a dict of tensors).

    The group shares one angle per step; `init`, if given, sets the zero threshold
    (1e-6·‖θ_init‖), otherwise only an exactly zero task vector counts as zero.
    """
    M = len(deltas)
    gram = [[_dot(deltas[i], deltas[j]) for j in range(M)] for i in range(M)]
    init_sq = _dot(init, init) if init is not None else 0.0
    coefs, _ = chain_coefficients(gram, weights, lam, init_sq)

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        out = sum(c * p.double() for c, p in zip(coefs, parts, strict=True))
        return out.to(parts[0].dtype)

    if isinstance(deltas[0], torch.Tensor):
        return combine(list(deltas))
    return {k: combine([d[k] for d in deltas]) for k in deltas[0]}


def liti(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """(1 − η)·θ_init + η·θ_merged, computed as θ_init + η·(θ_merged − θ_init)."""
    base = init.double()
    return (base + eta * (merged.double() - base)).to(init.dtype)
