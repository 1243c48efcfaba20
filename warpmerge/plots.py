"""The PNG figures of a merge: the WARP front (front.png) and per-layer angles (angles.png).

matplotlib is imported inside the functions, drawn with the Agg canvas directly (no pyplot: no
GUI backend, no global state), so importing warpmerge stays cheap. Each function returns the
data it drew, which is what tests and the card rely on.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
DPI = 100


@dataclass
class FrontPlot:
    labels: list[str]
    kl: list[float]
    reward: list[float | None]
    size: tuple[int, int]  # pixels (width, height)


@dataclass
class AnglesPlot:
    positions: list[str]  # x tick labels: layer indices, then other groups by name
    cos: dict[str, list[float]] = field(default_factory=dict)  # "run-a / run-b" -> per position
    norms: dict[str, list[float]] = field(default_factory=dict)  # run -> per position
    size: tuple[int, int] = (0, 0)


def import_matplotlib() -> None:
    """The modules the plots use (an import is done once per process; see api.run)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def point_label(model: dict[str, Any]) -> str:
    """η of a merged model ('η=0.3'), else its name."""
    return f"η={model['eta']:g}" if model.get("eta") is not None else str(model["name"])


def plot_front(data: dict[str, Any], path: str | Path) -> FrontPlot:
    """KL(π‖π_init) on x, mean reward on y, ± one standard error each, every point labelled.

    `data` is a FrontReport's to_dict() (front.json). Without rewards, the points sit on y = 0.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = data["models"]
    labels = [point_label(m) for m in models]
    kl = [float(m["kl"]["mean"]) for m in models]
    kl_err = [m["kl"].get("stderr") or 0.0 for m in models]
    reward = [m["reward"]["mean"] if m.get("reward") else None for m in models]
    reward_err = [(m["reward"].get("stderr") or 0.0) if m.get("reward") else 0.0
                  for m in models]
    fig = Figure(figsize=(6.4, 4.8), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = [r if r is not None else 0.0 for r in reward]
    merged = [m.get("eta") is not None for m in models]
    for i, (x, y) in enumerate(zip(kl, ys, strict=True)):
        color = "C0" if merged[i] else ("black" if i == 0 else "C1")
        ax.errorbar(x, y, xerr=kl_err[i], yerr=reward_err[i], fmt="o", color=color, capsize=3)
        ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    etas = sorted((m["eta"], k, y) for m, k, y in zip(models, kl, ys, strict=True)
                  if m.get("eta") is not None)
    if len(etas) > 1:  # the front itself: the η outputs joined in order
        ax.plot([e[1] for e in etas], [e[2] for e in etas], "-", color="C0", alpha=0.5)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("KL(π ‖ π_init), nats per sequence")
    ax.set_ylabel(f"mean reward ({data.get('reward') or 'none'})"[:60])
    ax.set_title("WARP front: reward against KL from the init")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    width, height = fig.canvas.get_width_height()
    return FrontPlot(labels, kl, reward, (int(width), int(height)))


def layer_values(groups: list[dict[str, Any]], run_names: list[str]) -> AnglesPlot | None:
    """Per layer (and per other group), cos Ω between each pair of runs and each run's norm.

    Groups of one layer (tensor granularity) are summed first: the Gram matrix of a layer is
    the sum of its tensors' Gram matrices, so the layer's angle is exact, not an average.
    None when no group has a Gram matrix (a single run).
    """
    grams: dict[str, list[list[float]]] = {}
    order: list[tuple[int, int, str]] = []  # (0: layers, 1: others), index, key
    for g in groups:
        gram = g.get("gram")
        if not gram:
            continue
        match = LAYER.search(str(g.get("name", "")))
        key = match.group(1) if match else _short(str(g.get("name", "?")))
        if key not in grams:
            grams[key] = [[0.0] * len(gram) for _ in gram]
            order.append((0, int(key), key) if match else (1, len(order), key))
        for i, row in enumerate(gram):
            for j, value in enumerate(row):
                grams[key][i][j] += float(value)
    if not grams:
        return None
    keys = [k for _, _, k in sorted(order)]
    m = len(next(iter(grams.values())))
    names = list(run_names)[:m] + [f"run-{i + 1}" for i in range(len(run_names), m)]
    plot = AnglesPlot(keys)
    for i in range(m):
        plot.norms[names[i]] = [math.sqrt(max(grams[k][i][i], 0.0)) for k in keys]
        for j in range(i + 1, m):
            plot.cos[f"{names[i]} / {names[j]}"] = [_cos(grams[k], i, j) for k in keys]
    return plot


def plot_angles(groups: list[dict[str, Any]], run_names: list[str],
                path: str | Path | io.BytesIO) -> AnglesPlot | None:
    """cos Ω between the runs' task vectors, and each task vector's norm, per layer.

    The paper's per-layer angle figure. Writes nothing and returns None for a single run.
    """
    plot = layer_values(groups, run_names)
    if plot is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 5.4), dpi=DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(plot.positions)))
    layers = [x for x in xs if plot.positions[x].isdigit()]  # joined by a line, others not
    others = [x for x in xs if not plot.positions[x].isdigit()]

    def draw(ax: Any, label: str, values: list[float], color: str) -> None:
        ax.plot(layers, [values[x] for x in layers], "o-", ms=3, color=color, label=label)
        ax.plot(others, [values[x] for x in others], "s", ms=5, color=color)

    for k, (label, values) in enumerate(plot.cos.items()):
        draw(top, label, values, f"C{k}")
    top.axhline(0.0, color="grey", lw=0.5)
    top.set_ylabel("cos Ω")
    top.set_title("Task vectors δ = θ_run − θ_init, per layer")
    for k, (label, values) in enumerate(plot.norms.items()):
        draw(bottom, label, values, f"C{k}")
    bottom.set_ylabel("‖δ‖")
    bottom.set_xlabel("layer")
    step = max(1, len(xs) // 24)  # at most ~24 tick labels
    bottom.set_xticks(xs[::step], plot.positions[::step], rotation=0 if step > 1 else 45,
                      fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")  # "best" searches: slow with many points
    fig.subplots_adjust(left=0.1, right=0.97, top=0.93, bottom=0.14, hspace=0.12)
    fig.savefig(path, format="png")
    width, height = fig.canvas.get_width_height()
    plot.size = (int(width), int(height))
    return plot


def angles_png(groups: list[dict[str, Any]], run_names: list[str]) -> bytes | None:
    """plot_angles' PNG as bytes (None with a single run), drawn once per merge."""
    buffer = io.BytesIO()
    if plot_angles(groups, run_names, buffer) is None:
        return None
    return buffer.getvalue()


class AnglesPainter:
    """Draws angles.png in a child process that imports matplotlib while the merge runs.

    Importing matplotlib takes about 0.5 s, as long as a sixth of a small merge. Started with
    the merge, on another core, the child is ready by the time the angles are known, and the
    figure costs only its drawing. Should the child fail, the figure is drawn here instead.
    """

    def __init__(self) -> None:
        self._request: tuple[list[dict[str, Any]], list[str]] = ([], [])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "warpmerge.plots"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def request(self, groups: list[dict[str, Any]], run_names: list[str]) -> None:
        """Ask for the figure of these groups; `result` collects it."""
        self._request = (groups, run_names)
        try:
            self._proc.stdin.write(json.dumps({"groups": groups, "runs": run_names}).encode())
            self._proc.stdin.close()
        except (OSError, ValueError):  # the child died, or was closed: result() draws here
            pass

    def result(self) -> bytes | None:
        try:
            png = self._proc.stdout.read()
        except (OSError, ValueError):
            png = b""
        self.close()
        if not png:
            return angles_png(*self._request)
        return png

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _paint_on_request() -> None:
    """The child of AnglesPainter: import first, then draw what stdin asks for."""
    import_matplotlib()
    request = json.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(angles_png(request["groups"], request["runs"]) or b"")
    sys.stdout.buffer.flush()
    os._exit(0)  # the parent is waiting: skip tearing matplotlib down


def _cos(gram: list[list[float]], i: int, j: int) -> float:
    denominator = math.sqrt(max(gram[i][i], 0.0) * max(gram[j][j], 0.0))
    return gram[i][j] / denominator if denominator > 0 else float("nan")


def _short(name: str) -> str:
    """'model.embed_tokens.weight' -> 'embed_tokens', 'model.norm' -> 'norm', 'model' stays."""
    parts = [p for p in name.split(".") if p not in ("model", "weight")]
    return ".".join(parts) or name


if __name__ == "__main__":
    _paint_on_request()
