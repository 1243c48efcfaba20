"""Checkpoint steps (`ema.every: auto`) and the EMA over real step gaps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from warpmerge.errors import InputError
from warpmerge.ops import effective_mu, ema_coefficients
from warpmerge.steps import (
    check_steps,
    checkpoint_step,
    last_number,
    parse_trainer_state,
    run_steps,
)


def constant_every_reference(T: int, mu: float, every: int, start: str = "init") -> list[float]:
    """The closed form warpmerge used before real steps existed (kept verbatim as the truth
    that a constant `every` must still reproduce bit for bit)."""
    mu_e = 1.0 - (1.0 - mu) ** every
    coefs = [mu_e * (1.0 - mu_e) ** (T - t) for t in range(1, T + 1)]
    if start == "first":
        coefs[0] = (1.0 - mu_e) ** (T - 1)
    return coefs


def optimizer_step_ema(steps: list[int], mu: float, start: str = "init") -> list[float]:
    """EMA weights by brute force: one update per optimizer step, the policy held at θ_t from
    s_{t−1} + 1 to s_t, in float64. θ_init = 0 and θ_t = e_t, so the EMA *is* the weights."""
    T = len(steps)
    ema = [0.0] * T
    done = 0
    if start == "first":
        ema[0], done = 1.0, steps[0]
    for t, s in enumerate(steps):
        theta = [1.0 if k == t else 0.0 for k in range(T)]
        for _ in range(done, s):
            ema = [(1.0 - mu) * e + mu * x for e, x in zip(ema, theta, strict=True)]
        done = max(done, s)
    return ema


# --- ema_coefficients --------------------------------------------------------------------------


def test_spec_worked_vectors() -> None:
    assert effective_mu(0.01, 100) == pytest.approx(0.633968, abs=5e-7)
    # EMA μ = 0.5, every = 1 over checkpoints 1, 2, 3 (θ_init = 0): 0.5, 1.25, 2.125
    for steps in (None, [1, 2, 3]):
        values = [sum(a * x for a, x in zip(ema_coefficients(T, 0.5, 1, steps=steps and
                                                              steps[:T]), [1, 2, 3],
                                            strict=False))
                  for T in (1, 2, 3)]
        assert values[1:] == [1.25, 2.125]
    assert ema_coefficients(1, 0.5, 1, steps=[1]) == [1.0]  # a lone checkpoint is itself
    assert sum(a * x for a, x in zip(ema_coefficients(2, 0.5, 1), [1, 2], strict=True)) == 1.25


@pytest.mark.parametrize("start", ["init", "first"])
def test_constant_every_is_bit_identical_to_evenly_spaced_steps(start: str) -> None:
    rng = random.Random(0)
    for _ in range(300):
        T, every = rng.randint(1, 12), rng.choice([1, 2, 7, 50, 100, 500])
        mu = rng.choice([0.01, 0.3, 0.5, 1.0, rng.random()])
        old = constant_every_reference(T, mu, every, start) if T > 1 else [1.0]
        assert ema_coefficients(T, mu, every, start) == old  # exact, not approx
        steps = [t * every for t in range(1, T + 1)]
        assert ema_coefficients(T, mu, 1, start, steps=steps) == old
        if start == "first" and T > 1:  # the first gap does not count: s_1 is the EMA's start
            offset = rng.randint(1, 999)
            shifted = [s + offset for s in steps]
            assert ema_coefficients(T, mu, 1, start, steps=shifted) == old


@pytest.mark.parametrize("start", ["init", "first"])
def test_uneven_steps_match_the_optimizer_step_ema(start: str) -> None:
    cases = [[100, 200, 400], [50, 150, 200], [3, 4, 10, 11, 30], [1, 1000], [7, 8, 9, 100]]
    rng = random.Random(1)
    for _ in range(20):
        cases.append(sorted(rng.sample(range(1, 400), rng.randint(2, 6))))
    for steps in cases:
        for mu in (0.01, 0.1, 0.5):
            got = ema_coefficients(len(steps), mu, start=start, steps=steps)
            assert got == pytest.approx(optimizer_step_ema(steps, mu, start), rel=1e-12,
                                        abs=1e-15)


def test_steps_must_strictly_increase_and_use_last_ignores_them() -> None:
    with pytest.raises(ValueError, match="strictly increase"):
        ema_coefficients(3, 0.1, steps=[100, 100, 200])
    with pytest.raises(ValueError, match="one step per checkpoint"):
        ema_coefficients(3, 0.1, steps=[100, 200])
    assert ema_coefficients(3, 0.1, use="last", steps=[1, 5, 6]) == [0.0, 0.0, 1.0]


# --- where steps come from ---------------------------------------------------------------------


def test_parse_trainer_state() -> None:
    assert parse_trainer_state('{"global_step": 500, "log_history": []}', "x") == 500
    for bad in ('{"global_step": 0}', '{"global_step": "5"}', '{"global_step": 5.0}',
                '{"global_step": true}', '{}', '[]', 'not json', '{"global_step": -3}'):
        with pytest.raises(InputError) as err:
            parse_trainer_state(bad, "run-a checkpoint 2 (checkpoint-5)")
        assert str(err.value).startswith("run-a checkpoint 2 (checkpoint-5): trainer_state.json")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "step"), [
    ("checkpoint-500", 500), ("global_step10-v2", 2), ("step_0120", 120),
    ("Training in progress, step 4200", 4200), ("final", None), (None, None),
    ("checkpoint-0", None), ("", None),
])
def test_last_number(text: str | None, step: int | None) -> None:
    assert last_number(text) == step


def test_checkpoint_step_prefers_trainer_state_then_name_then_title(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-300"
    folder.mkdir()
    assert checkpoint_step(folder, folder.name, "Training in progress, step 9", "c") == 300
    assert checkpoint_step(folder, None, "Training in progress, step 9", "c") == 9
    assert checkpoint_step(folder, "final", None, "c") is None
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 310}))
    assert checkpoint_step(folder, folder.name, "step 9", "c") == 310
    (folder / "trainer_state.json").write_text('{"global_step": ')
    with pytest.raises(InputError, match="^c: trainer_state.json is not valid JSON$"):
        checkpoint_step(folder, folder.name, None, "c")


def test_check_steps_names_the_checkpoint_at_fault() -> None:
    labels = ["a checkpoint 1 (x)", "a checkpoint 2 (y)", "a checkpoint 3 (z)"]
    assert check_steps([1, 5, 9], labels) == [1, 5, 9]
    with pytest.raises(InputError, match=r"^a checkpoint 3 \(z\): step 5 does not follow step 5"):
        check_steps([1, 5, 5], labels)
    with pytest.raises(InputError, match=r"^a checkpoint 2 \(y\): step 4 does not follow step 9"):
        check_steps([9, 4, 12], labels)
    with pytest.raises(InputError, match=r"^a checkpoint 2 \(y\): no step for ema.every: auto"):
        check_steps([1, None, 12], labels)


def test_run_steps(tmp_path: Path) -> None:
    class Opened:  # what run_steps reads of an opened checkpoint
        def __init__(self, path: Path) -> None:
            self.path, self.label = path, f"run checkpoint ({path.name})"

    class HubRef:  # a Hub history commit: no folder name, a title
        name, title = None, "Training in progress, step 40"

    folders = [tmp_path / "checkpoint-10", tmp_path / "snapshot-sha-99"]
    for f in folders:
        f.mkdir()
    opened = [Opened(f) for f in folders]
    assert run_steps(opened, [str(folders[0]), HubRef()], "auto") == [10, 40]
    assert run_steps(opened, [str(folders[0]), HubRef()], 25) == [25, 50]
    with pytest.raises(InputError, match=r"\(checkpoint-10\): step 10 does not follow step 99"):
        run_steps(opened[::-1], [str(folders[1]), str(folders[0])], "auto")
