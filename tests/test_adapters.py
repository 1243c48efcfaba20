"""Adapter checkpoints (PEFT LoRA / DoRA) read as task vectors: the truth is PEFT itself.

The fixture holds runs saved by PEFT 0.21 with, per checkpoint, what `merge_and_unload()` gives;
the slow tests build adapters with the installed `peft` on tiny transformers models and compare
with its own merge, for the options the fixture lacks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from warpmerge import adapters
from warpmerge.adapters import ROW_BLOCK, is_adapter, open_adapter
from warpmerge.errors import InputError
from warpmerge.modelfolder import read_header

FIXTURES = Path(__file__).parent / "fixtures"
BASE = FIXTURES / "gemma2-tiny"
LORA = FIXTURES / "gemma2-tiny-lora"
CHECKPOINTS = sorted(p.relative_to(LORA).as_posix() for p in LORA.glob("run-*/checkpoint-*"))
# PEFT's fixture runs were made from this path (see the fixture README)
TRAINED_ON = "shared/fixtures/gemma2-tiny"
# Tolerance: a few float32 ulps of the tensor's largest element. Measured: LoRA (rsLoRA,
# patterns, embeddings, biases, modules_to_save, Conv1D) is bit-identical to PEFT's merge;
# DoRA differs by at most 1.2e-7 absolute (1 ulp at the weights' scale; PEFT's norms over the
# full matrix and ours by row blocks round differently), 3.0e-8 with the default row blocks.
ULPS = 4


def init_infos(folder: Path = BASE):
    return read_header(folder / "model.safetensors", "init")[0]


def init_tensors(folder: Path = BASE) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def reader(w0: torch.Tensor):
    flat = w0.float().reshape(-1)
    return lambda start, count: flat[start:start + count].clone()


def full_delta(adapter, name: str, w0: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The whole ΔW of one tensor, asked for in chunks of `chunk` elements."""
    n = w0.numel()
    chunk = chunk or n
    parts = [adapter.delta(name, s, min(chunk, n - s), reader(w0)) for s in range(0, n, chunk)]
    return torch.cat(parts).view(w0.shape)


def assert_merges_like(adapter, init: dict[str, torch.Tensor],
                       merged: dict[str, torch.Tensor]) -> None:
    """init + ΔW equals the merged model for every tensor; ΔW is None exactly where the
    merged tensor is the init's."""
    for name, w0 in init.items():
        expected = merged[name]
        if not adapter.changes(name):
            assert adapter.delta(name, 0, w0.numel(), reader(w0)) is None
            assert torch.equal(expected, w0), f"{name} changed but the adapter says not"
            continue
        got = w0.float() + full_delta(adapter, name, w0)
        assert not torch.equal(expected, w0), f"{name} unchanged but the adapter changes it"
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(got, expected.float(), rtol=0,
                                   atol=ULPS * torch.finfo(torch.float32).eps * scale)


# ---------------------------------------------------------------- the PEFT fixture


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_fixture_checkpoint_matches_peft_merge(checkpoint):
    reference = load_file(str(LORA / "reference.safetensors"))
    tag = checkpoint + "/"
    changed = {k[len(tag):]: v for k, v in reference.items() if k.startswith(tag)}
    init = init_tensors()
    adapter = open_adapter(LORA / checkpoint, checkpoint, init_infos(), init_ref=TRAINED_ON)
    assert set(adapter.edits) == set(changed)
    assert_merges_like(adapter, init, {**init, **changed})
    assert adapter.warnings == ()


def test_fixture_kinds_of_edit():
    """What the fixture's README says each run is, read back from our description."""
    infos = init_infos()
    a = open_adapter(LORA / "run-a/checkpoint-100", "a", infos)
    q = a.edits["model.layers.0.self_attn.q_proj.weight"]
    assert q.low_rank.scale == 8 / 4 and q.magnitude is None and q.base is None
    b = open_adapter(LORA / "run-b/checkpoint-150", "b", infos)
    assert b.edits["model.layers.0.mlp.down_proj.weight"].low_rank.scale == 16 / 2 ** 0.5
    assert b.edits["model.layers.0.self_attn.o_proj.weight"].low_rank.scale == 3 / 8 ** 0.5
    embed = b.edits["model.embed_tokens.weight"]
    assert embed.low_rank.transposed and embed.base is not None
    assert b.edits["model.norm.weight"].low_rank is None
    c = open_adapter(LORA / "run-c/checkpoint-100", "c", infos)
    assert c.edits["model.layers.3.self_attn.v_proj.weight"].magnitude.shape == (48,)
    assert is_adapter(LORA / "run-c/checkpoint-100") and not is_adapter(BASE)


@pytest.mark.parametrize("row_block", [200, ROW_BLOCK])  # 200: several row blocks a tensor
@pytest.mark.parametrize("checkpoint", ["run-b/checkpoint-300", "run-c/checkpoint-250"])
def test_chunking_never_changes_a_bit(checkpoint, row_block, monkeypatch):
    """Chunks are arbitrary element ranges: any split gives the same bits."""
    monkeypatch.setattr(adapters, "ROW_BLOCK", row_block)
    init = init_tensors()
    adapter = open_adapter(LORA / checkpoint, "x", init_infos())
    for name in adapter.edits:
        w0 = init[name]
        whole = full_delta(adapter, name, w0)
        for chunk in (331, 4099, row_block + 3):
            assert torch.equal(full_delta(adapter, name, w0, chunk), whole), (name, chunk)
    if row_block < ROW_BLOCK:  # and the values are still PEFT's
        test_fixture_checkpoint_matches_peft_merge(checkpoint)


def test_base_model_mismatch_is_a_warning_naming_both():
    adapter = open_adapter(LORA / "run-a/checkpoint-100", "run-a checkpoint 1", init_infos(),
                           init_ref="google/gemma-2-9b-it")
    (warning,) = adapter.warnings
    assert "run-a checkpoint 1" in warning and TRAINED_ON in warning
    assert "google/gemma-2-9b-it" in warning
    assert open_adapter(LORA / "run-a/checkpoint-100", "x", init_infos(),
                        init_ref=TRAINED_ON + "/").warnings == ()


def test_trainer_files_are_never_opened(tmp_path):
    """Only adapter_config.json and adapter_model.safetensors are opened (audit events record
    every open, whoever makes it)."""
    opened: list[str] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed: switched off below
    try:
        folder = LORA / "run-b/checkpoint-150"
        init = init_tensors()
        adapter = open_adapter(folder, "x", init_infos())
        for name in adapter.edits:
            full_delta(adapter, name, init[name], chunk=5000)
    finally:
        recording[0] = False
    inside = {Path(p).name for p in opened if Path(p).parent == folder}
    assert inside == {"adapter_config.json", "adapter_model.safetensors"}
    assert (folder / "optimizer.pt").exists()


# ---------------------------------------------------------------- refusals


def copy_checkpoint(tmp_path: Path, run: str = "run-a/checkpoint-100") -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(LORA / run, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, drop: tuple[str, ...] = (), **add: torch.Tensor) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    tensors.update({k.replace("__", "."): v for k, v in add.items()})
    save_file(tensors, str(path), metadata={"format": "pt"})


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def refused(folder: Path, *culprits: str) -> str:
    with pytest.raises(InputError) as caught:
        open_adapter(folder, "run-a checkpoint 1", init_infos())
    message = str(caught.value)
    assert "\n" not in message and message.startswith("run-a checkpoint 1: ")
    for culprit in culprits:
        assert culprit in message, (culprit, message)
    return message


@pytest.mark.parametrize("key, value", [
    ("peft_type", "LOHA"),
    ("trainable_token_indices", [1, 2]),
    ("layer_replication", [[0, 2], [1, 3]]),
    ("target_parameters", ["experts.gate_up_proj"]),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("r", "four"),
    ("bias", "some"),
    ("rank_pattern", {"q_proj": 2.5}),
    ("target_modules", r".*(q_proj"),
])
def test_unsupported_or_malformed_config_is_refused(tmp_path, key, value):
    folder = copy_checkpoint(tmp_path)
    edit_config(folder, **{key: value})
    refused(folder, "adapter_config.json", key)


def test_unreadable_inputs_are_refused(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    refused(folder, "adapter_config.json", "not valid JSON")
    (folder / "adapter_config.json").write_text("[1, 2]")
    refused(folder, "adapter_config.json", "not a JSON object")
    (folder / "adapter_config.json").unlink()
    refused(folder, "missing file adapter_config.json")
    folder = copy_checkpoint(tmp_path / "b")
    (folder / "adapter_model.safetensors").unlink()
    refused(folder, "missing file adapter_model.safetensors")


def test_pickled_adapter_is_refused_never_opened(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    (folder / "adapter_model.bin").chmod(0)  # belt and braces: the audit hook is the proof
    opened: list[str] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        refused(folder, "adapter_model.bin", "pickle")
    finally:
        recording[0] = False
    assert not any(p.endswith(".bin") for p in opened)


@pytest.mark.parametrize("change, culprits", [
    # a tensor PEFT's LoRA never writes
    (dict(add={Q + ".lora_C.weight": torch.zeros(4, 64)}), (Q + ".lora_C.weight", "unknown")),
    # a full tensor the init does not have
    (dict(add={"base_model.model.model.extra.weight": torch.zeros(3)}),
     ("base_model.model.model.extra.weight", "unknown")),
    # factors that do not fit the init's weight
    (dict(add={Q + ".lora_A.weight": torch.zeros(4, 65)}), (Q + ".lora_A.weight", "[r, 65]")),
    # a rank the config does not give
    (dict(add={Q + ".lora_A.weight": torch.zeros(3, 64), Q + ".lora_B.weight":
               torch.zeros(96, 3)}), (Q, "rank 3", "r=4")),
    # half a module
    (dict(drop=(Q + ".lora_B.weight",)), (Q + ".lora_A.weight", "lora_B")),
    # a module target_modules does not select
    (dict(config={"target_modules": ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj"]}), (Q + ".lora_A.weight", "target_modules")),
    (dict(config={"layers_to_transform": [1]}), (".layers.0.", "target_modules")),
    (dict(config={"exclude_modules": ["layers.0.self_attn.q_proj"]}),
     (Q + ".lora_A.weight", "target_modules")),
    (dict(config={"target_modules": r".*\.(k|v|o|gate|up|down)_proj|.*q_pro"}),
     (".q_proj.lora_A.weight", "target_modules")),
    # DoRA parts without DoRA, and DoRA without its magnitude
    (dict(add={Q + ".lora_magnitude_vector": torch.ones(96)}),
     (Q + ".lora_magnitude_vector", "use_dora")),
    (dict(config={"use_dora": True}), (".lora_magnitude_vector", "use_dora")),
    # a LoRA bias without lora_bias, and with it where the init has no bias
    (dict(add={Q + ".lora_B.bias": torch.ones(96)}), (Q + ".lora_B.bias", "lora_bias")),
    (dict(add={Q + ".lora_B.bias": torch.ones(96)}, config={"lora_bias": True}),
     (Q + ".lora_B.bias", "model.layers.0.self_attn.q_proj.bias")),
    # a saved full tensor of the wrong shape
    (dict(add={"base_model.model.model.norm.weight": torch.ones(65)}),
     ("base_model.model.model.norm.weight", "[65]", "[64]")),
])
def test_bad_tensors_are_refused_naming_them(tmp_path, change, culprits):
    folder = copy_checkpoint(tmp_path)
    edit_config(folder, **change.get("config", {}))
    edit_weights(folder, drop=change.get("drop", ()), **change.get("add", {}))
    refused(folder, "adapter_model.safetensors", *culprits)


# ---------------------------------------------------------------- adapters made by PEFT here

GEMMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_bias=True)
PEFT_CASES = {
    "regex-target": dict(target_modules=r".*\.(q_proj|down_proj)", r=4, lora_alpha=8),
    "all-linear-rslora": dict(target_modules="all-linear", r=4, lora_alpha=6, use_rslora=True),
    "layers-to-transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                layers_pattern="layers", r=2, lora_alpha=4),
    "exclude": dict(target_modules=["q_proj", "o_proj"],
                    exclude_modules=["layers.0.self_attn.o_proj"]),
    "bias-all": dict(target_modules=["q_proj"], bias="all"),
    "bias-lora-only": dict(target_modules=["k_proj", "gate_proj"], bias="lora_only"),
    "lora-bias": dict(target_modules=["q_proj", "v_proj", "o_proj"], lora_bias=True,
                      lora_alpha=3, r=2, bias="lora_only"),
    "patterns": dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], r=4,
                     lora_alpha=8,
                     rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 3,
                                   r"layers\.\d\.(self_attn\.q|mlp\.up)_proj": 5},
                     alpha_pattern={r"model\.layers\.1\..*": 3, "o_proj": 12}),
    "dora": dict(target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True, r=3,
                 lora_alpha=5, rank_pattern={"down_proj": 2}),
    "dora-all-linear": dict(target_modules="all-linear", use_dora=True, use_rslora=True,
                            modules_to_save=["post_attention_layernorm"]),
    "embedding": dict(target_modules=["embed_tokens", "v_proj"], r=4, lora_alpha=4),
    "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["norm"]),
}


def peft_adapter(tmp_path: Path, model, options: dict, seed: int = 0):
    """Save `model` as the init, wrap it with PEFT, randomise every trainable parameter as
    training would, save the adapter; returns (init folder, adapter folder, merged tensors)."""
    from peft import LoraConfig, get_peft_model

    init_dir, adapter_dir = tmp_path / "init", tmp_path / "adapter"
    model.save_pretrained(init_dir)
    peft_model = get_peft_model(model, LoraConfig(**options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if p.ndim == 1 else 0))
    peft_model.save_pretrained(adapter_dir)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return init_dir, adapter_dir, merged


def gemma(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**GEMMA))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_adapter_made_by_peft_merges_like_peft(tmp_path, case):
    pytest.importorskip("peft")
    init_dir, adapter_dir, merged = peft_adapter(tmp_path, gemma(), PEFT_CASES[case])
    adapter = open_adapter(adapter_dir, case, init_infos(init_dir))
    assert adapter.edits, "the case changes nothing: it tests nothing"
    assert_merges_like(adapter, init_tensors(init_dir), merged)


@pytest.mark.slow
def test_all_linear_left_unexpanded_in_the_config(tmp_path):
    """PEFT writes all-linear out as module names; a config that still says all-linear
    selects every linear layer but the head."""
    pytest.importorskip("peft")
    init_dir, adapter_dir, merged = peft_adapter(tmp_path, gemma(), PEFT_CASES["all-linear-rslora"])
    edit_config(adapter_dir, target_modules="all-linear")
    adapter = open_adapter(adapter_dir, "x", init_infos(init_dir))
    assert len(adapter.edits) == 14
    assert_merges_like(adapter, init_tensors(init_dir), merged)


@pytest.mark.slow
def test_fan_in_fan_out_conv1d_layers_of_gpt2(tmp_path):
    """GPT-2 stores its linear layers transposed (Conv1D): ΔW is (B@A)ᵀ there, including the
    square attention output projection."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    options = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4,
                   lora_alpha=8)
    init_dir, adapter_dir, merged = peft_adapter(tmp_path, model, options)
    adapter = open_adapter(adapter_dir, "gpt2", init_infos(init_dir))
    assert adapter.edits["transformer.h.0.attn.c_proj.weight"].low_rank.transposed
    assert_merges_like(adapter, init_tensors(init_dir), merged)


@pytest.mark.slow
def test_dora_on_an_embedding_is_refused(tmp_path):
    """PEFT's DoRA on an embedding normalises columns (over the whole vocabulary): not
    streamable by rows, so refused, naming the magnitude tensor."""
    pytest.importorskip("peft")
    init_dir, adapter_dir, _ = peft_adapter(tmp_path, gemma(), dict(
        target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(InputError, match=r"adapter_model.safetensors: tensor "
                       r"base_model\.model\.model\.embed_tokens\.lora_magnitude_vector"):
        open_adapter(adapter_dir, "x", init_infos(init_dir))
