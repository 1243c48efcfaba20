"""The figures: what each plot draws (returned with it) and that the PNG decodes at its size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from warpmerge.plots import AnglesPainter, angles_png, layer_values, plot_angles, plot_front


def gram(a: float, b: float, ab: float) -> list[list[float]]:
    return [[a, ab], [ab, b]]


def test_angles_per_layer_from_the_gram_matrices(tmp_path: Path) -> None:
    groups = [
        {"name": "model.embed_tokens.weight", "gram": gram(4.0, 9.0, 3.0)},
        {"name": "model.layers.10", "gram": gram(1.0, 1.0, 0.0)},
        {"name": "model.layers.2", "gram": gram(4.0, 1.0, -1.0)},
        {"name": "model.norm.weight", "gram": gram(1.0, 4.0, 2.0)},
    ]
    plot = plot_angles(groups, ["run-a", "run-b"], tmp_path / "angles.png")
    assert plot is not None
    assert plot.positions == ["2", "10", "embed_tokens", "norm"]  # layers by index, then others
    assert plot.cos == {"run-a / run-b": pytest.approx([-0.5, 0.0, 0.5, 1.0])}
    assert plot.norms == {"run-a": pytest.approx([2.0, 1.0, 2.0, 1.0]),
                          "run-b": pytest.approx([1.0, 1.0, 3.0, 2.0])}
    image = imread(tmp_path / "angles.png")
    assert image.shape[:2] == (plot.size[1], plot.size[0]) == (540, 720)


def test_tensor_groups_of_a_layer_are_summed_exactly() -> None:
    """A layer's angle from its tensors' Gram matrices: the sum, not a mean of cosines."""
    groups = [
        {"name": "model.layers.0.mlp.up_proj.weight", "gram": gram(1.0, 1.0, 1.0)},
        {"name": "model.layers.0.self_attn.q_proj.weight", "gram": gram(3.0, 3.0, -3.0)},
        {"name": "model.layers.1.mlp.up_proj.weight", "gram": gram(2.0, 8.0, 0.0)},
    ]
    plot = layer_values(groups, ["a", "b"])
    assert plot is not None and plot.positions == ["0", "1"]
    assert plot.cos["a / b"] == pytest.approx([-2.0 / 4.0, 0.0])
    assert plot.norms["b"] == pytest.approx([2.0, math.sqrt(8.0)])


def test_one_run_has_no_angles(tmp_path: Path) -> None:
    groups = [{"name": "model", "gram": None, "chain": [], "coefficients": [1.0]}]
    assert plot_angles(groups, ["solo"], tmp_path / "angles.png") is None
    assert not (tmp_path / "angles.png").exists()


def test_three_runs_give_three_pairs(tmp_path: Path) -> None:
    g = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]
    plot = plot_angles([{"name": "model", "gram": g}], ["a", "b", "c"], tmp_path / "x.png")
    assert plot is not None and plot.positions == ["model"]
    assert plot.cos == {"a / b": [0.0], "a / c": [0.5], "b / c": [0.0]}


def test_front_plot_labels_every_point(tmp_path: Path) -> None:
    def model(name: str, eta: float | None, kl: float, reward: float) -> dict:
        return {"name": name, "eta": eta, "kl": {"mean": kl, "stderr": 0.1, "per_token": 0.0},
                "reward": {"mean": reward, "stderr": 0.05}, "samples": []}

    data = {"reward": "rm", "models": [model("init", None, 0.0, 0.1), model("eta-0.3", 0.3, 1, 0.4),
                                       model("eta-1", 1.0, 4, 0.6), model("run-a", None, 6, 0.7)]}
    plot = plot_front(data, tmp_path / "front.png")
    assert plot.labels == ["init", "η=0.3", "η=1", "run-a"]
    assert plot.kl == [0.0, 1.0, 4.0, 6.0] and plot.reward == [0.1, 0.4, 0.6, 0.7]
    image = imread(tmp_path / "front.png")
    assert image.shape[:2] == (plot.size[1], plot.size[0]) == (480, 640)


def test_the_painter_child_draws_what_is_drawn_here() -> None:
    """angles.png from the child process that imported matplotlib during the merge is the same
    PNG, byte for byte, as the one drawn in this process."""
    groups = [{"name": f"model.layers.{i}", "gram": gram(1.0 + i, 2.0, 0.3 * i)} for i in range(3)]
    painter = AnglesPainter()
    painter.request(groups, ["a", "b"])
    png = painter.result()
    assert png == angles_png(groups, ["a", "b"])
    assert png.startswith(b"\x89PNG")


def test_the_painter_falls_back_when_its_child_is_gone() -> None:
    groups = [{"name": "model.layers.0", "gram": gram(1.0, 2.0, 0.5)}]
    painter = AnglesPainter()
    painter.close()  # killed before the request: the figure is drawn here
    painter.request(groups, ["a", "b"])
    assert painter.result() == angles_png(groups, ["a", "b"])


@pytest.mark.slow
def test_only_a_process_first_merge_has_a_painter_child(tmp_path: Path) -> None:
    """In a fresh interpreter: the first merge's angles.png comes from a child (matplotlib never
    imported here); the second merge draws here, importing matplotlib once, not a child per
    merge. Both figures are the same PNG a child draws."""
    import subprocess
    import sys

    from test_engine import make_setup

    make_setup(tmp_path, 2, [2, 2])
    cfg = tmp_path / "warp.yaml"
    cfg.write_text("init: init\npolicies:\n  - checkpoints: run0/step-*\n"
                   "  - checkpoints: run1/step-*\n")
    script = (
        "import sys, warpmerge, warpmerge.api as api\n"
        "r1 = warpmerge.run(sys.argv[1], out=sys.argv[2])\n"
        "print(api._painter_started, 'matplotlib.figure' in sys.modules)\n"
        "r2 = warpmerge.run(sys.argv[1], out=sys.argv[3])\n"
        "print(api._painter_started, 'matplotlib.figure' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(cfg), str(tmp_path / "o1"),
                           str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True False", "True True"]
    assert (tmp_path / "o1" / "angles.png").read_bytes() == (
        tmp_path / "o2" / "angles.png").read_bytes()
