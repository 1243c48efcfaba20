"""The spec's worked vectors, and the coefficient math against direct vector formulas."""

from __future__ import annotations

import math

import pytest
import torch

import warpmerge
from warpmerge.ops import chain_coefficients, chain_lambdas, effective_mu, ema_coefficients


def test_slerp_orthogonal_half():
    r = warpmerge.slerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], lam=0.5)
    assert r.tolist() == pytest.approx([0.70711, 0.70711], abs=1e-5)
    assert r.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_slerp_chain_of_three_basis_vectors():
    e = torch.eye(3, dtype=torch.float64)
    r = warpmerge.slerp([e[0], e[1], e[2]])
    assert r.tolist() == pytest.approx([0.61237, 0.61237, 0.5], abs=1e-5)
    r2 = warpmerge.slerp([e[0], e[1]])
    assert r2.tolist() == pytest.approx([0.70711, 0.70711, 0.0], abs=1e-5)


def test_ema_worked_vector():
    init = torch.tensor(0.0, dtype=torch.float64)
    ckpts = [torch.tensor(float(v), dtype=torch.float64) for v in (1, 2, 3)]
    got = [warpmerge.ema(ckpts[:t], init, mu=0.5, every=1).item() for t in (1, 2, 3)]
    # the spec's 0.5, 1.25, 2.125, except that a run of one checkpoint contributes the
    # checkpoint itself (spec, stage 1)
    assert got == pytest.approx([1.0, 1.25, 2.125], abs=1e-12)
    coefs = ema_coefficients(3, 0.5, 1)
    assert coefs == pytest.approx([0.125, 0.25, 0.5], abs=1e-12)
    assert ema_coefficients(2, 0.5, 1) == pytest.approx([0.25, 0.5], abs=1e-12)


def test_effective_mu():
    assert effective_mu(0.01, 100) == pytest.approx(0.633968, abs=1e-6)
    assert effective_mu(0.3, 1) == pytest.approx(0.3)


def test_ema_coefficients_match_step_by_step_recursion():
    mu, every, T = 0.2, 3, 4
    mu_e = 1 - (1 - mu) ** every
    for start in ("init", "first"):
        # recursion on symbolic coefficient vectors over (init, θ_1..θ_T)
        ema = [1.0] + [0.0] * T if start == "init" else [0.0, 1.0] + [0.0] * (T - 1)
        for t in range(1 if start == "init" else 2, T + 1):
            ema = [(1 - mu_e) * v for v in ema]
            ema[t] += mu_e
        coefs = ema_coefficients(T, mu, every, start)
        assert coefs == pytest.approx(ema[1:], rel=1e-12)
        assert sum(ema) == pytest.approx(1.0)
    assert ema_coefficients(4, mu, every, use="last") == [0, 0, 0, 1]
    assert ema_coefficients(1, mu, every) == [1.0]


def test_chain_lambdas_from_weights():
    assert chain_lambdas([1, 1, 1]) == pytest.approx([1 / 2, 1 / 3])
    assert chain_lambdas([1, 3]) == pytest.approx([0.75])
    assert chain_lambdas([1, 1], lam=0.2) == [0.2]


def test_slerp_endpoints_and_lerp_fallbacks():
    a, b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-0.3, 0.1, 2.0])
    assert torch.allclose(warpmerge.slerp([a, b], lam=0.0), a)
    assert torch.allclose(warpmerge.slerp([a, b], lam=1.0), b, atol=1e-6)
    zero = torch.zeros(3)
    assert torch.equal(warpmerge.slerp([a, zero], lam=0.5), 0.5 * a)  # zero vector: LERP
    assert torch.allclose(warpmerge.slerp([a, 2 * a], lam=0.5), 1.5 * a)  # collinear: LERP
    # tiny relative to the init: counts as zero
    init = torch.full((3,), 1e3)
    tiny = torch.tensor([1e-6, 0.0, 0.0])
    got = warpmerge.slerp([a, tiny], lam=0.5, init=init)
    assert torch.allclose(got, 0.5 * a + 0.5 * tiny)


def _direct_slerp(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    cos = torch.dot(x, y) / (x.norm() * y.norm())
    omega = math.acos(max(-1.0, min(1.0, cos.item())))
    return (math.sin((1 - lam) * omega) * x + math.sin(lam * omega) * y) / math.sin(omega)


def test_chain_coefficients_equal_direct_vector_chain():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4)]
    weights = [1.0, 2.0, 0.5, 3.0]
    gram = [[torch.dot(a, b).item() for b in deltas] for a in deltas]
    coefs, steps = chain_coefficients(gram, weights)
    r = deltas[0]
    total = weights[0]
    for m in range(1, 4):
        total += weights[m]
        r = _direct_slerp(r, deltas[m], weights[m] / total)
    combined = sum(c * d for c, d in zip(coefs, deltas, strict=True))
    assert torch.allclose(combined, r, atol=1e-12)
    assert [s.mode for s in steps] == ["slerp"] * 3


def test_slerp_groups_share_one_angle():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0])}
    b = {"x": torch.tensor([0.0, 0.0]), "y": torch.tensor([1.0])}
    got = warpmerge.slerp([a, b], lam=0.5)
    assert got["x"].tolist() == pytest.approx([0.70711, 0.0], abs=1e-5)
    assert got["y"].tolist() == pytest.approx([0.70711], abs=1e-5)


def test_liti():
    init, merged = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert warpmerge.liti(init, merged, 0.0).tolist() == [1.0, 2.0]
    assert warpmerge.liti(init, merged, 0.5).tolist() == [2.0, 1.0]
    assert warpmerge.liti(init, merged, 2.0).tolist() == [5.0, -2.0]
