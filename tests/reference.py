"""The independent float64 reference of WARP, written from the spec (shared/spec/warp.md),
not from the engine: EMA step by step, SLERP chains on whole concatenated groups, LITI.

Tests compare the engine's outputs with it; it shares no code with warpmerge.
"""

from __future__ import annotations

import math
import re

import torch


def ref_ema(init, ckpts, mu, every, start, use):
    """The EMA step by step; `every` is a constant gap or each checkpoint's step (a list)."""
    if len(ckpts) == 1 or use == "last":
        return ckpts[-1]
    steps = every if isinstance(every, list) else [every * (t + 1) for t in range(len(ckpts))]
    gaps = [b - a for a, b in zip([0, *steps], steps, strict=False)]
    ema = ckpts[0] if start == "first" else init
    for c, gap in list(zip(ckpts, gaps, strict=True))[1 if start == "first" else 0:]:
        mu_e = 1 - (1 - mu) ** gap
        ema = (1 - mu_e) * ema + mu_e * c
    return ema


def ref_group_key(name, granularity):
    if granularity == "model":
        return "all"
    m = re.match(r"(.*layers\.\d+)\.", name)
    return m.group(1) if granularity == "layer" and m else name


def ref_slerp(x, y, lam, zero_sq):
    nx, ny = x.dot(x).item(), y.dot(y).item()
    if nx <= zero_sq or ny <= zero_sq:
        return (1 - lam) * x + lam * y
    cos = max(-1.0, min(1.0, x.dot(y).item() / math.sqrt(nx * ny)))
    om = math.acos(cos)
    if math.sin(om) < 1e-6:
        return (1 - lam) * x + lam * y
    return (math.sin((1 - lam) * om) * x + math.sin(lam * om) * y) / math.sin(om)


def reference(init, runs, *, mu=0.01, every=1, start="init", use="ema",
              granularity="layer", weights=None, lam=None, etas=(0.3,), steps=None):
    """θ_η for each η, from whole tensors in float64. `steps`: each run's checkpoint steps
    (every: auto), else checkpoints `every` steps apart."""
    init = {k: v.double() for k, v in init.items()}
    runs = [[{k: v.double() for k, v in c.items()} for c in run] for run in runs]
    names = list(init)
    steps = steps or [every] * len(runs)
    P = [{k: ref_ema(init[k], [c[k] for c in run], mu, s, start, use) for k in names}
         for run, s in zip(runs, steps, strict=True)]
    groups = {}
    for k in names:
        groups.setdefault(ref_group_key(k, granularity), []).append(k)
    weights = weights or [1.0] * len(runs)
    merged = {}
    for keys in groups.values():
        flat_init = torch.cat([init[k].flatten() for k in keys])
        deltas = [torch.cat([(p[k] - init[k]).flatten() for k in keys]) for p in P]
        zero_sq = (1e-6) ** 2 * flat_init.dot(flat_init).item()
        r, total = deltas[0], weights[0]
        for m in range(1, len(deltas)):
            total += weights[m]
            lam_m = lam if lam is not None else weights[m] / total
            r = ref_slerp(r, deltas[m], lam_m, zero_sq)
        offset = 0
        for k in keys:
            n = init[k].numel()
            merged[k] = r[offset:offset + n].view(init[k].shape)
            offset += n
    return [{k: init[k] + eta * merged[k] for k in names} for eta in etas]
