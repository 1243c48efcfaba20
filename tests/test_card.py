"""The model card: front matter the Hub parses, a body that explains the merge, no local paths."""

from __future__ import annotations

import copy

import pytest
from huggingface_hub import ModelCard

from warpmerge.card import render_card

HOME = "/home/alice/secret-project"


def provenance() -> dict:
    return {
        "warpmerge_version": "0.1.0",
        "created": "2026-11-28T18:00:00Z",
        "eta": 0.3,
        "config": {
            "init": "google/gemma-2-9b-it",
            "policies": [
                {"name": "run-a", "checkpoints": [f"{HOME}/runs/a/step-1000", "org/ckpt@v1"],
                 "weight": 1.0},
                {"name": "run-b", "checkpoints": f"{HOME}/runs/b/checkpoint-*", "weight": 2.0},
            ],
            "ema": {"mu": 0.01, "every": 4, "start": "init", "use": "ema",
                    "save": f"{HOME}/ema"},
            "slerp": {"granularity": "layer", "lambda": None},
            "liti": {"eta": [0.3, 0.5]},
            "output": {"path": f"{HOME}/out/warp", "dtype": "bfloat16",
                       "shard_size": 5000000000, "copy_tokenizer": True,
                       "push_to_hub": {"repo_id": "alice/warp", "private": True,
                                       "revision": None}},
            "check": None,
        },
        "inputs": [
            {"role": "init", "run": None, "ref": "google/gemma-2-9b-it",
             "repo_id": "google/gemma-2-9b-it", "revision": None, "commit": "a" * 40,
             "files": [{"name": "model.safetensors", "size": 2_000_000, "header_sha256": "x"}]},
            {"role": "checkpoint", "run": "run-a", "ref": f"{HOME}/runs/a/step-1000",
             "repo_id": None, "revision": None, "commit": None,
             "files": [{"name": "model.safetensors", "size": 10, "header_sha256": "y"}]},
            {"role": "checkpoint", "run": "run-a", "ref": "org/ckpt@v1", "repo_id": "org/ckpt",
             "revision": "v1", "commit": "b" * 40, "files": []},
            {"role": "checkpoint", "run": "run-b", "ref": f"{HOME}/runs/b/checkpoint-7",
             "repo_id": None, "revision": None, "commit": None, "files": []},
        ],
        "runs": [
            {"name": "run-a", "weight": 1.0, "checkpoints": 2,
             "ema_coefficients": [0.25, 0.75]},
            {"name": "run-b", "weight": 2.0, "checkpoints": 1, "ema_coefficients": [1.0]},
        ],
        "groups": [
            {"name": "model.layers.0", "numel": 123,
             "chain": [{"run": "run-b", "lambda": 0.667, "cos_omega": 0.5, "mode": "slerp"}],
             "coefficients": [0.7, 0.7]},
            {"name": "model.layers.1", "numel": 123,
             "chain": [{"run": "run-b", "lambda": 0.667, "cos_omega": 0.0, "mode": "slerp"}],
             "coefficients": [0.7, 0.7]},
        ],
        "check": None,
    }


def test_front_matter_parses_with_the_merge_metadata() -> None:
    card = ModelCard(render_card(provenance(), license="gemma"))
    data = card.data.to_dict()
    assert data["base_model"] == ["google/gemma-2-9b-it", "org/ckpt"]  # init first
    assert data["base_model_relation"] == "merge"
    assert data["tags"] == ["merge", "warp", "warpmerge"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "gemma"


def test_no_license_when_the_init_has_none() -> None:
    assert "license" not in ModelCard(render_card(provenance())).data.to_dict()


def test_body_says_what_was_merged_and_how() -> None:
    text = render_card(provenance())
    body = ModelCard(text).text
    for needle in ("google/gemma-2-9b-it", "org/ckpt@v1", "aaaaaaaaaaaa", "run-a", "run-b",
                   "μ = 0.01", "4 optimizer step(s)", "per layer", "run-a: 1, run-b: 2",
                   "η = 0.3", "0.25, 0.75", "60.00°", "90.00°", "## Configuration",
                   "granularity: layer", "repo_id: alice/warp"):
        assert needle in body, needle
    assert "## Check" not in body


def test_local_paths_are_folder_names_only() -> None:
    text = render_card(provenance())
    assert "/home" not in text and "secret-project" not in text
    body = ModelCard(text).text
    for name in ("step-1000", "checkpoint-7", "checkpoint-*", "path: warp", "save: ema"):
        assert name in body, name


def test_lambda_and_single_run() -> None:
    p = provenance()
    p["config"]["slerp"]["lambda"] = 0.25
    assert "λ = 0.25" in render_card(p)
    p["runs"] = p["runs"][:1]
    assert "single run" in render_card(p)


def test_only_local_inputs_give_no_base_model() -> None:
    p = provenance()
    for item in p["inputs"]:
        item.update(repo_id=None, revision=None, commit=None, ref=f"{HOME}/m/{item['role']}")
    p["config"]["init"] = f"{HOME}/m/init"
    data = ModelCard(render_card(p)).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["tags"] == ["merge", "warp", "warpmerge"]
    assert "/home" not in render_card(p)


def test_check_figures_become_a_table() -> None:
    """The card renders the dict that CheckReport.to_dict() produces."""
    p = provenance()
    p["check"] = {
        "dtype": "float32",
        "check_tokens": {"source": "builtin", "sequences": 8, "positions": 512},
        "model": {"path": f"{HOME}/out/warp", "nll": 2.125, "kl": None},
        "against": [
            {"path": f"{HOME}/models/init", "nll": 2.5, "kl": 0.01, "kl_reverse": 0.02,
             "top1_agreement": 0.95},
        ],
    }
    body = ModelCard(render_card(p)).text
    assert "## Check" in body
    assert "| model | NLL | KL | reverse KL | top-1 agreement |" in body
    assert "| this merge | 2.125 | – | – | – |" in body
    assert "| `init` | 2.5 | 0.01 | 0.02 | 0.95 |" in body
    assert "8 builtin check sequences (512 positions)" in body
    assert "/home" not in body


def test_ema_output_card() -> None:
    p = provenance()
    p.update(eta=None, ema_of_run="run-a")
    body = ModelCard(render_card(p)).text
    assert "EMA of run-a" in body


def test_tokens_never_appear(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_SuperSecretTokenValue123456"
    monkeypatch.setenv("HF_TOKEN", token)
    p = copy.deepcopy(provenance())
    p["config"]["policies"][0]["name"] = token  # even if it somehow got into the provenance
    p["runs"][0]["name"] = token
    text = render_card(p)
    assert token not in text
    ModelCard(text)  # still a valid card


def test_plots_and_this_models_front_row() -> None:
    p = provenance()
    assert "![" not in render_card(p)  # no plots recorded: no images
    p["plots"] = {"angles": "angles.png"}
    p["front"] = {"plot": "front.png", "reward": "Skywork/Skywork-Reward-Gemma-2-27B-v0.2",
                  "model": {"name": "eta-0.3", "path": "eta-0.3", "eta": 0.3,
                            "kl": {"mean": 1.25, "stderr": 0.5, "per_token": 0.0125},
                            "reward": {"mean": 0.75, "stderr": 0.125}}}
    body = ModelCard(render_card(p)).text
    # relative paths: the images sit beside README.md in the pushed folder
    assert "](angles.png)" in body and "](front.png)" in body
    assert "| eta-0.3 | 0.3 | 1.25 ± 0.5 | 0.0125 | 0.75 ± 0.125 |" in body
    assert body.index("## SLERP angles") < body.index("](angles.png)") < body.index("## WARP front")
