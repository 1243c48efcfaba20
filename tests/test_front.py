"""The WARP front: the KL estimate against an exact enumeration, seeding, the JSON's figures,
rewards (function and reward model), input errors, the CLI and the run's front.json."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOOD_CONFIG, TINY, perturb, random_model, run_cli, write_model, write_tokenizer

from warpmerge.errors import InputError
from warpmerge.gemma2 import Gemma2
from warpmerge.kl_reward import (
    Sample,
    front,
    mean_stderr,
    sample_completions,
    score_samples,
)

FIXTURES = Path(__file__).parent / "fixtures"
STOP = 1  # <eos>: the only stop id in a vocabulary of 4 (<end_of_turn> is 107, out of range)
# A Gemma 2 small enough to enumerate every completion: 4 tokens, completions of <= 3 tokens.
ENUM = dict(TINY, vocab_size=4, final_logit_softcapping=None)
PROMPTS = [[2, 3, 0], [2, 0]]
LENGTH = 3
WORDS = dict(TINY, vocab_size=320)  # room for the tokenizer's <start_of_turn> (106)


def enum_models(tmp_path: Path) -> tuple[Path, Path]:
    init = random_model(3, ENUM)
    policy = perturb(init, 4, scale=0.3)  # KL of about 1 nat per completion
    return (write_model(tmp_path / "init", init, ENUM),
            write_model(tmp_path / "policy", policy, ENUM))


def exact_kl(pi: Gemma2, init: Gemma2, prompt: list[int]) -> float:
    """Σ_y π(y)·log(π(y)/π_init(y)) over every completion y (float64, by enumeration).

    A completion stops at <eos> (kept) or after LENGTH tokens: the y's are every sequence of
    non-stop tokens of length < LENGTH followed by <eos>, and every sequence of length LENGTH
    whose earlier tokens are not <eos>.
    """
    def log_prob(model: Gemma2, y: tuple[int, ...]) -> float:
        ids = torch.tensor([prompt + list(y)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids)[0].double(), dim=-1)
        return sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(y))

    others = [t for t in range(4) if t != STOP]
    completions = [prefix + (STOP,) for n in range(LENGTH)
                   for prefix in itertools.product(others, repeat=n)]
    completions += [prefix + (last,) for prefix in itertools.product(others, repeat=LENGTH - 1)
                    for last in others]
    total, mass = 0.0, 0.0
    for y in completions:
        lp, lq = log_prob(pi, y), log_prob(init, y)
        total += math.exp(lp) * (lp - lq)
        mass += math.exp(lp)
    # the enumeration covers every completion (up to float32 logits that differ in the last
    # bit between sequence lengths)
    assert mass == pytest.approx(1.0, abs=1e-6)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimate_is_within_three_standard_errors_of_the_exact_kl(
        tmp_path: Path, seed: int) -> None:
    init_path, policy_path = enum_models(tmp_path)
    pi, init = Gemma2.from_pretrained(policy_path), Gemma2.from_pretrained(init_path)
    for p, prompt in enumerate(PROMPTS):
        samples = sample_completions(pi, [prompt], None, 400, LENGTH, seed + 10 * p, (STOP,))
        assert all(len(s.completion_ids) <= LENGTH for s in samples)
        assert all(STOP not in s.completion_ids[:-1] for s in samples)
        score_samples(pi, samples, "logp")
        score_samples(init, samples, "logp_init")
        mean, stderr = mean_stderr([s.logp - s.logp_init for s in samples])
        exact = exact_kl(pi, init, prompt)
        assert exact > 0.05  # a material KL, or the check says nothing
        assert stderr is not None and abs(mean - exact) < 3 * stderr, (mean, stderr, exact)


def test_log_probs_of_a_batch_match_each_sequence_alone(tmp_path: Path) -> None:
    """Right padding in score_samples must not change a row's log-probs."""
    _, policy_path = enum_models(tmp_path)
    pi = Gemma2.from_pretrained(policy_path)
    samples = [Sample(0, [2, 3], c, "") for c in ([0], [3, 0, 2], [STOP], [2, 2])]
    score_samples(pi, samples, "logp")
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            lp = torch.log_softmax(pi(ids)[0].double(), dim=-1)
        alone = sum(float(lp[len(s.prompt_ids) - 1 + t, tok])
                    for t, tok in enumerate(s.completion_ids))
        assert s.logp == pytest.approx(alone, abs=1e-5)


# --- the whole front, on the tiny fixture with a word-level tokenizer -------------------------


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    init = random_model(0, WORDS)
    paths = {"init": write_model(tmp_path / "init", init, WORDS),
             "near": write_model(tmp_path / "near", perturb(init, 1, scale=0.02), WORDS),
             "far": write_model(tmp_path / "far", perturb(init, 2, scale=0.1), WORDS)}
    for p in paths.values():
        write_tokenizer(p)
    (paths["far"] / "warpmerge.json").write_text(json.dumps({"eta": 0.5}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hello world", "answer": "w3"},
        {"prompt": "w1 w2 w5", "answer": "w7"},
    ]) + "\n")
    paths["prompts"] = prompts
    (tmp_path / "frontrewards.py").write_text(
        "def exact(prompts, completions, answer, **kwargs):\n"
        "    return [float(a in c.split()) for c, a in zip(completions, answer)]\n"
        "def length(prompts, completions, completion_ids):\n"
        "    return [len(ids) for ids in completion_ids]\n"
        "def answer_number(prompts, completions, answer):\n"
        "    return [float(a[1:]) for a in answer]\n"
        "def short(prompts, completions):\n    return [1.0]\n"
        "def boom(prompts, completions):\n    raise ValueError('no luck')\n"
        "def words(prompts, completions):\n    return ['high'] * len(completions)\n"
        "def needs_label(prompts, completions, label):\n    return [0.0] * len(completions)\n")
    sys.path.insert(0, str(tmp_path))
    yield paths
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == "frontrewards"]:
        del sys.modules[name]


def run_front(models: dict[str, Path], **kwargs: object) -> dict:
    args = dict(init=models["init"], prompts=models["prompts"], reward="frontrewards:length",
                samples=3, max_new_tokens=6, seed=0)
    args.update(kwargs)
    return front([models["near"], models["far"]], **args).to_dict()


def test_figures_recompute_from_the_listed_samples(models: dict[str, Path]) -> None:
    data = run_front(models)
    assert [m["name"] for m in data["models"]] == ["init", "near", "far"]
    assert [m["eta"] for m in data["models"]] == [None, None, 0.5]
    for m in data["models"]:
        s = m["samples"]
        assert len(s) == 2 * 3 and sorted({x["prompt"] for x in s}) == [0, 1]
        diffs = [x["logp"] - x["logp_init"] for x in s]
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        assert m["kl"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert m["kl"]["stderr"] == pytest.approx(sd / math.sqrt(len(diffs)), abs=1e-12)
        tokens = sum(len(x["completion_ids"]) for x in s)
        assert m["kl"]["per_token"] == pytest.approx(sum(diffs) / tokens, abs=1e-12)
        rewards = [x["reward"] for x in s]
        assert rewards == [float(len(x["completion_ids"])) for x in s]  # the function's values
        assert m["reward"]["mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-12)
    init = data["models"][0]
    assert init["kl"] == {"mean": 0.0, "stderr": 0.0, "per_token": 0.0}  # exactly
    assert data["models"][2]["kl"]["mean"] > data["models"][1]["kl"]["mean"] > 0

    # logp and logp_init, recomputed by a plain forward pass of each model on its samples
    for m in data["models"][1:]:
        pi = Gemma2.from_pretrained(m["path"])
        init_model = Gemma2.from_pretrained(models["init"])
        for x in m["samples"][:3]:
            ids = torch.tensor([x["prompt_ids"] + x["completion_ids"]])
            start = len(x["prompt_ids"]) - 1
            for model, key in ((pi, "logp"), (init_model, "logp_init")):
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids)[0].double(), dim=-1)
                expected = sum(float(lp[start + t, tok])
                               for t, tok in enumerate(x["completion_ids"]))
                assert x[key] == pytest.approx(expected, abs=1e-4)


def test_the_same_seed_gives_the_same_samples(models: dict[str, Path]) -> None:
    first, again = run_front(models, seed=7), run_front(models, seed=7)
    other = run_front(models, seed=8)

    def ids(data: dict) -> list:
        return [[x["completion_ids"] for x in m["samples"]] for m in data["models"]]

    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert first == again


def test_reward_function_gets_the_fields_by_name(models: dict[str, Path]) -> None:
    data = run_front(models, reward="frontrewards:answer_number")
    for m in data["models"]:
        assert [x["reward"] for x in m["samples"]] == [[3.0, 7.0][x["prompt"]]
                                                       for x in m["samples"]]
    data = run_front(models, reward="frontrewards:exact")
    for m in data["models"]:
        for x in m["samples"]:
            answer = ["w3", "w7"][x["prompt"]]
            assert x["reward"] == float(answer in x["completion"].split())


@pytest.mark.parametrize(("reward", "message"), [
    ("frontrewards:short", "frontrewards:short returned 1 values for 6 completions"),
    ("frontrewards:boom", "frontrewards:boom raised ValueError: no luck"),
    ("frontrewards:words", "frontrewards:words returned 'high', not a finite number"),
    ("frontrewards:needs_label", "prompts.jsonl:1: no 'label' field, which reward function "
                                 "frontrewards:needs_label needs"),
    ("frontrewards:nope", "frontrewards has no nope"),
    ("nomodule_xyz:f", "cannot import nomodule_xyz"),
])
def test_reward_function_errors(models: dict[str, Path], reward: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        run_front(models, reward=reward)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_input_errors(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"text": "no prompt"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2: expected a record with a 'prompt'"):
        run_front(models, prompts=bad)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hello"}) + "\n"
                    + json.dumps({"prompt": " ".join(["w1"] * 80)}) + "\n")
    with pytest.raises(InputError, match=r"long.jsonl:2: the prompt is 86 tokens, the model's "
                                         r"context is 64"):
        run_front(models, prompts=long)
    with pytest.raises(InputError, match="missing: model folder does not exist"):
        front([tmp_path / "missing"], init=models["init"], prompts=models["prompts"])


def test_models_larger_than_memory_are_refused_up_front(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import warpmerge.kl_reward as wf

    monkeypatch.setattr(wf, "_available_bytes", lambda device: 1000)
    with pytest.raises(InputError, match=r"init: needs 0\.0 GB in float32 on cpu, only"):
        run_front(models)


def test_chat_prompts_render_with_the_gemma_format(models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    try:
        from warpmerge.gemma2 import render_chat  # noqa: F401
    except ImportError:
        pytest.skip("warpmerge.gemma2.render_chat is not there yet (another branch adds it)")
    from warpmerge.gemma2 import load_tokenizer

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"prompt": [{"role": "user", "content": "hello world"}]}]))
    data = run_front(models, prompts=chat)
    tok = load_tokenizer(models["init"])
    expected = tok.encode("<bos><start_of_turn>user\nhello world<end_of_turn>\n"
                          "<start_of_turn>model\n", add_special_tokens=False).ids
    assert data["models"][0]["samples"][0]["prompt_ids"] == expected


def test_reward_model_scores_the_rendered_conversation(models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from warpmerge.gemma2 import Gemma2RewardModel, load_tokenizer

    rm = tmp_path / "rm"
    shutil.copytree(FIXTURES / "gemma2-rm-tiny", rm)
    write_tokenizer(rm, 320)
    data = run_front(models, reward=None, reward_model=rm)
    assert data["reward"] == str(rm)
    scorer = Gemma2RewardModel.from_pretrained(rm)
    tok = load_tokenizer(rm)
    x = data["models"][1]["samples"][0]
    prompt = ["hello world", "w1 w2 w5"][x["prompt"]]
    text = (f"<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
            f"{x['completion']}<end_of_turn>\n")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert x["reward"] == pytest.approx(float(scorer(torch.tensor([ids]))[0]), abs=1e-6)
    assert len({s["reward"] for s in data["models"][1]["samples"]}) > 1


def test_cli_json_table_and_plot(models: dict[str, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["front", str(models["near"]), str(models["far"]), "--init", str(models["init"]),
            "--prompts", str(models["prompts"]), "--reward", "frontrewards:length",
            "--samples", "2", "--max-new-tokens", "4", "-q"]
    code, out, err = run_cli([*args, "--json"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data["models"][0]) == {"name", "path", "eta", "kl", "reward", "samples"}
    assert set(data["models"][0]["samples"][0]) == {
        "prompt", "prompt_ids", "completion_ids", "completion", "logp", "logp_init", "reward"}
    plot = tmp_path / "front.png"
    code, out, err = run_cli([*args, "--plot", str(plot)], monkeypatch, capsys)
    assert code == 0 and "KL (nats)" in out and "η=0.5" not in out and plot.is_file()
    code, out, err = run_cli([*args, "--reward", "frontrewards:boom"], monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "boom raised" in err
    code, out, err = run_cli([*args, "--device", "tpu"], monkeypatch, capsys)
    assert code == 2 and "--device" in err


def test_run_with_a_front_section_writes_front_json_and_png(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warpmerge

    setup = tmp_path
    init = random_model(0, WORDS)
    write_model(setup / "init", init, WORDS)
    for run in ("a", "b"):
        current = init
        for t in (1, 2):
            current = perturb(current, 10 * ord(run) + t)
            write_model(setup / f"run-{run}" / f"step-{t}", current, WORDS)
    (setup / "warp.yaml").write_text(GOOD_CONFIG)
    write_tokenizer(setup / "init")
    (setup / "prompts.jsonl").write_text(json.dumps({"prompt": "hello world"}) + "\n")
    (setup / "runrewards.py").write_text(
        "def length(prompts, completions, completion_ids):\n"
        "    return [len(i) for i in completion_ids]\n")
    monkeypatch.syspath_prepend(str(setup))
    config = setup / "warp.yaml"
    config.write_text(config.read_text() + "front:\n  prompts: prompts.jsonl\n"
                      "  reward: runrewards:length\n  samples: 2\n  max_new_tokens: 4\n")
    result = warpmerge.run(config)
    root = setup / "out"
    data = json.loads((root / "front.json").read_text())
    assert [m["name"] for m in data["models"]] == ["init", "eta-0.3", "eta-1", "a (last)",
                                                    "b (last)"]
    assert [m["path"] for m in data["models"]] == ["init", "eta-0.3", "eta-1", "step-2",
                                                    "step-2"]  # folder names only
    assert (root / "front.png").is_file()
    for folder in result.outputs:
        assert (folder / "front.png").is_file() and (folder / "angles.png").is_file()
        card = (folder / "README.md").read_text()
        assert "](front.png)" in card and "](angles.png)" in card
        provenance = json.loads((folder / "warpmerge.json").read_text())
        assert provenance["front"]["model"]["eta"] == provenance["eta"]


def test_a_failing_front_keeps_the_merge_for_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front runs after the merge: when it fails (here the reward function raises), the
    merged weights stay staged, and --resume after the fix skips straight to the front."""
    import warpmerge
    from warpmerge.errors import ConfigError, InputError

    setup = tmp_path
    init = random_model(0, WORDS)
    write_model(setup / "init", init, WORDS)
    for run in ("a", "b"):
        write_model(setup / f"run-{run}" / "step-1", perturb(init, ord(run)), WORDS)
    (setup / "warp.yaml").write_text(GOOD_CONFIG.replace("run-a/step-*", "run-a/step-1")
                                     .replace("[run-b/step-1, run-b/step-2]", "[run-b/step-1]"))
    write_tokenizer(setup / "init")
    (setup / "prompts.jsonl").write_text(json.dumps({"prompt": "hello world"}) + "\n")
    (setup / "rew.py").write_text("def score(prompts, completions):\n    raise ValueError\n")
    monkeypatch.syspath_prepend(str(setup))
    config = setup / "warp.yaml"
    config.write_text(config.read_text() + "front:\n  prompts: prompts.jsonl\n"
                      "  reward: rew:score\n  samples: 1\n  max_new_tokens: 2\n")
    with pytest.raises((ConfigError, InputError), match="kept.*--resume"):
        warpmerge.run(config)
    staging = setup / ".out.warpmerge-partial"
    shard = sorted((staging / "eta-0.3").glob("model*.safetensors"))[0]
    assert shard.is_file() and not (setup / "out").exists()
    stamp = shard.stat().st_mtime_ns
    (setup / "rew.py").write_text("def score(prompts, completions):\n"
                                  "    return [1.0 for _ in completions]\n")
    import importlib
    import sys
    sys.modules.pop("rew", None)
    importlib.invalidate_caches()
    config.write_text(config.read_text().replace("samples: 1", "samples: 2"))  # front only
    result = warpmerge.run(config, resume=True)
    kept = result.outputs[0] / shard.name
    assert kept.stat().st_mtime_ns == stamp  # the merge was not redone
    assert (result.outputs[0].parent / "front.json").is_file()


def test_warpmerge_front_is_the_function() -> None:
    """The module has another name: a submodule named front would replace the function."""
    import warpmerge
    import warpmerge.api  # noqa: F401  (imports the front's module)
    import warpmerge.kl_reward

    assert warpmerge.front is warpmerge.kl_reward.front


@pytest.mark.parametrize(("section", "message"), [
    ("front:\n  prompts: p.jsonl\n  device: tpu\n", "warp.yaml:12: front.device: device must be"),
    ("front:\n  prompts: p.jsonl\n  reward: m:f\n  reward_model: rm\n",
     "warp.yaml:10: front: give reward_model or reward, not both"),
    ("front:\n  prompts: p.jsonl\n  sample: 4\n", "front.sample: unknown key (did you mean "
                                                  "'samples'?)"),
    ("front:\n  reward: m:f\n", "front.prompts: field required"),
])
def test_front_config_errors(tmp_path: Path, section: str, message: str) -> None:
    from warpmerge.config import load_config
    from warpmerge.errors import ConfigError

    (tmp_path / "warp.yaml").write_text(GOOD_CONFIG + section)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "warp.yaml")
    assert message in str(err.value)


def test_run_checks_the_front_inputs_before_writing(tmp_path: Path) -> None:
    import warpmerge

    init = random_model(0, WORDS)
    write_model(tmp_path / "init", init, WORDS)
    for run in ("a", "b"):
        for t in (1, 2):
            write_model(tmp_path / f"run-{run}" / f"step-{t}", perturb(init, t), WORDS)
    (tmp_path / "warp.yaml").write_text(GOOD_CONFIG + "front:\n  prompts: missing.jsonl\n")
    with pytest.raises(InputError, match="missing.jsonl: prompts file does not exist"):
        warpmerge.run(tmp_path / "warp.yaml")
    assert not (tmp_path / "out").exists()
