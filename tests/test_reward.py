"""The bundled Gemma 2 reward model against transformers' Gemma2ForSequenceClassification.

Truths: the checked-in fixture (scores transformers computed elsewhere) and transformers run here
on random reward models of other shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warpmerge.errors import InputError
from warpmerge.gemma2 import Gemma2RewardModel

transformers = pytest.importorskip("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "gemma2-rm-tiny"


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


def test_fixture_float32(reference: dict[str, torch.Tensor]) -> None:
    rm = Gemma2RewardModel.from_pretrained(FIXTURE, dtype=torch.float32, device="cpu")
    ids, lengths = reference["input_ids"], reference["lengths"]
    scores = rm(ids, attention_mask=padding_mask(lengths, ids.shape[1]))
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert (scores - reference["scores_fp32"]).abs().max() <= 1e-5
    alone = torch.stack([rm(ids[i, : int(n)])[0] for i, n in enumerate(lengths)])
    assert (alone - reference["scores_fp32"]).abs().max() <= 1e-5
    assert rm.config.num_labels == 1 and rm.config.hidden_size == 64


def test_fixture_bfloat16(reference: dict[str, torch.Tensor]) -> None:
    rm = Gemma2RewardModel.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    ids = reference["input_ids"]
    scores = rm(ids, attention_mask=padding_mask(reference["lengths"], ids.shape[1]))
    assert scores.dtype == torch.float32
    # bfloat16 rounding differs between CPUs (the fixture's README: a few 1e-2)
    assert (scores - reference["scores_bf16"]).abs().max() <= 5e-2


def test_without_mask_reads_the_last_position(reference: dict[str, torch.Tensor]) -> None:
    rm = Gemma2RewardModel.from_pretrained(FIXTURE)
    full_row = reference["input_ids"][:1]  # row 0 has 20 real tokens: no padding
    assert reference["lengths"][0] == full_row.shape[1]
    assert abs(float(rm(full_row)[0]) - float(reference["scores_fp32"][0])) <= 1e-5


def make_reward_model(folder: Path, seed: int, **shape: object) -> Path:
    torch.manual_seed(seed)
    kwargs: dict = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=1.0,  # tiny: it would squash the scores if we applied it
        initializer_range=0.3,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=0,
    )
    kwargs.update(shape)
    model = transformers.Gemma2ForSequenceClassification(transformers.Gemma2Config(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
        model.score.weight.normal_(0.0, 2.0)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"num_key_value_heads": 1, "head_dim": 16, "attn_logit_softcapping": None,
         "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
        {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 36,
         "query_pre_attn_scalar": 10, "sliding_window": 2, "final_logit_softcapping": None},
    ],
    ids=["gqa-caps", "mqa-custom-layers", "mha-small-window"],
)
def test_random_reward_models_match_transformers(tmp_path: Path, shape: dict) -> None:
    folder = make_reward_model(tmp_path / "rm", seed=len(shape), **shape)
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([13, 9, 5])
    ids = torch.randint(4, 96, (3, 13), generator=gen)  # real tokens are never <pad> = 0
    ids[:, 0] = 2
    mask = padding_mask(lengths, 13)
    ids = ids.masked_fill(mask == 0, 0)  # right padding, as transformers pools it
    hf = transformers.Gemma2ForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
    ours = Gemma2RewardModel.from_pretrained(folder)(ids, attention_mask=mask)
    assert (ours - theirs).abs().max() <= 1e-5
    assert theirs.abs().max() > 1.0  # the final cap of 1.0 was indeed not applied


def test_more_than_one_label_is_refused(tmp_path: Path) -> None:
    folder = make_reward_model(tmp_path / "rm", seed=0)
    raw = json.loads((folder / "config.json").read_text())
    raw["id2label"] = {"0": "bad", "1": "good"}
    raw["label2id"] = {"bad": 0, "good": 1}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"config\.json.*num_labels"):
        Gemma2RewardModel.from_pretrained(folder)
