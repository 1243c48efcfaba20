"""Which tensors share one SLERP angle, per granularity (spec, stage 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warpmerge.modelfolder import TensorInfo
from warpmerge.planner import group_key, make_groups

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.10.mlp.down_proj.weight",
    "model.layers.1.mlp.down_proj.weight",  # back to layer 1 after layer 10
    "model.norm.weight",
    "lm_head.weight",
    "model.vision.encoder.layers.0.fc.weight",  # another stack's layers
    "model.layers_extra.weight",  # 'layers' but no block number
]


def infos(names: list[str]) -> list[TensorInfo]:
    return [TensorInfo(n, torch.float32, (2,), Path("x.safetensors"), 8 * i, 8)
            for i, n in enumerate(names)]


@pytest.mark.parametrize("name,key", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0"),
    ("model.layers.10.mlp.down_proj.weight", "model.layers.10"),
    ("model.vision.encoder.layers.0.fc.weight", "model.vision.encoder.layers.0"),
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.layers_extra.weight", "model.layers_extra.weight"),
    ("model.layers.3", "model.layers.3"),  # no '.' after the number: not a block's tensor
])
def test_layer_key(name, key):
    assert group_key(name, "layer") == key


def test_tensor_and_model_keys():
    assert all(group_key(n, "tensor") == n for n in NAMES)
    assert {group_key(n, "model") for n in NAMES} == {"model"}


def groups(granularity: str) -> list[tuple[str, list[str]]]:
    return [(g.name, [t.name for t in g.tensors]) for g in make_groups(infos(NAMES), granularity)]


def test_layer_groups_keep_first_seen_order_and_gather_a_block():
    assert groups("layer") == [
        ("model.embed_tokens.weight", ["model.embed_tokens.weight"]),
        ("model.layers.0", ["model.layers.0.self_attn.q_proj.weight",
                            "model.layers.0.mlp.up_proj.weight"]),
        ("model.layers.1", ["model.layers.1.input_layernorm.weight",
                            "model.layers.1.mlp.down_proj.weight"]),
        ("model.layers.10", ["model.layers.10.mlp.down_proj.weight"]),
        ("model.norm.weight", ["model.norm.weight"]),
        ("lm_head.weight", ["lm_head.weight"]),
        ("model.vision.encoder.layers.0", ["model.vision.encoder.layers.0.fc.weight"]),
        ("model.layers_extra.weight", ["model.layers_extra.weight"]),
    ]


def test_tensor_groups_are_single_tensors():
    assert groups("tensor") == [(n, [n]) for n in NAMES]


def test_model_group_is_everything_in_order():
    assert groups("model") == [("model", NAMES)]
    group = make_groups(infos(NAMES), "model")[0]
    assert group.float_numel == 2 * len(NAMES)
