"""The output folder: transformers loads it as is; shards, index, headers and metadata."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import load_model, perturb, random_model, write_model

import warpmerge
from warpmerge.config import build_config


def merge(tmp_path: Path, shard_size: str, dtype: str | None = "bfloat16",
          eta=0.3) -> Path:
    init = random_model(0)
    write_model(tmp_path / "init", init)
    (tmp_path / "init" / "generation_config.json").write_text('{"eos_token_id": [1, 107]}')
    (tmp_path / "init" / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (tmp_path / "init" / "optimizer.pt").write_bytes(b"not copied")
    for r in range(2):
        write_model(tmp_path / f"run{r}" / "ck", perturb(init, r + 1))
    cfg = build_config(
        init="init", policies=[{"checkpoints": ["run0/ck"]}, {"checkpoints": ["run1/ck"]}],
        liti={"eta": eta}, output={"path": "out", "dtype": dtype, "shard_size": shard_size},
    ).with_base_dir(tmp_path)
    return warpmerge.run(cfg).outputs[0]


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_transformers_loads_sharded_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = merge(tmp_path, "10KB")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.bfloat16)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_model(out)
    state = model.state_dict()
    for k, v in ours.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(state["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_shards_index_and_headers(tmp_path):
    out = merge(tmp_path, "10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        header = read_header(out / shard)
        assert header.pop("__metadata__") == {"format": "pt"}
        size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        total += size
        assert all(index["weight_map"][k] == shard for k in header)
        assert all(e["dtype"] == "BF16" for e in header.values())
        # every shard but a lone oversized tensor respects the limit
        assert size <= 10_000 or len(header) == 1
        (hlen,) = struct.unpack("<Q", (out / shard).read_bytes()[:8])
        assert (out / shard).stat().st_size == 8 + hlen + size
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(random_model(0))


def test_single_shard_and_metadata_files(tmp_path):
    out = merge(tmp_path, "5GB", dtype="float32", eta=[0.5])
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json",
                     "tokenizer_config.json", "warpmerge.json", "README.md", "angles.png"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    prov = json.loads((out / "warpmerge.json").read_text())
    assert prov["warpmerge_version"] == warpmerge.__version__
    assert prov["eta"] == 0.5
    assert [i["role"] for i in prov["inputs"]] == ["init", "checkpoint", "checkpoint"]
    assert all(len(f["header_sha256"]) == 64 for i in prov["inputs"] for f in i["files"])
    groups = {g["name"]: g for g in prov["groups"]}
    assert set(groups) == {"model.embed_tokens.weight", "model.layers.0", "model.layers.1",
                           "model.norm.weight"}
    layer = groups["model.layers.0"]
    assert layer["chain"][0]["mode"] == "slerp" and -1 <= layer["chain"][0]["cos_omega"] <= 1
    # nearly orthogonal task vectors at lambda 0.5: coefficients near sin(45°)/sin(90°)
    assert layer["coefficients"] == pytest.approx([0.7071, 0.7071], abs=0.05)
    card = (out / "README.md").read_text()
    assert card.startswith("---")
    assert not list(tmp_path.glob(".*warpmerge-partial"))


@pytest.mark.slow
def test_check_section_adds_figures_to_provenance_and_card(tmp_path):
    """`check: {}` runs the bundled Gemma 2 check on the result against the init and runs."""
    init = random_model(0)
    write_model(tmp_path / "init", init)
    for r in range(2):
        write_model(tmp_path / f"run{r}" / "ck", perturb(init, r + 1, scale=0.05))
    cfg = build_config(
        init="init", policies=[{"checkpoints": ["run0/ck"]}, {"checkpoints": ["run1/ck"]}],
        liti={"eta": 0.0}, output={"path": "out"}, check={},
    ).with_base_dir(tmp_path)
    out = warpmerge.run(cfg).outputs[0]
    figures = json.loads((out / "warpmerge.json").read_text())["check"]
    assert figures["model"]["path"] == "out"
    against = {a["path"]: a for a in figures["against"]}
    assert set(against) == {"init", "ck"}
    # eta = 0 reproduces the init exactly: no divergence from it, full agreement
    assert against["init"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert against["init"]["top1_agreement"] == 1.0
    assert figures["model"]["nll"] == pytest.approx(against["init"]["nll"], rel=1e-6)
    card = (out / "README.md").read_text()
    assert "| model | NLL | KL | reverse KL | top-1 agreement |" in card
    assert str(tmp_path) not in card and str(tmp_path) not in (out / "warpmerge.json").read_text()


def test_check_section_needs_a_gemma2_init(tmp_path):
    from warpmerge.errors import InputError

    init = random_model(0)
    write_model(tmp_path / "init", init, cfg={"model_type": "llama"})
    write_model(tmp_path / "run0" / "ck", perturb(init, 1))
    cfg = build_config(init="init", policies=[{"checkpoints": ["run0/ck"]}],
                       output={"path": "out"}, check={}).with_base_dir(tmp_path)
    with pytest.raises(InputError):
        warpmerge.run(cfg)
    assert not (tmp_path / "out").exists()


def test_every_output_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    """After a power cut the final name must hold the whole model or nothing: each file and
    folder of the staging tree is fsynced while it still has its staging name, and the parent
    folder after the rename."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = merge(tmp_path, "10KB", eta=[0.3, 1.0])
    root = out.parent
    staging = str(root.parent / f".{root.name}.warpmerge-partial")
    expected = {str(p).replace(str(root), staging, 1) for p in root.rglob("*")} | {staging}
    assert len(expected) > 12  # two models of several shards, their metadata, the folders
    assert expected <= set(synced)
    assert synced[-1] == str(root.parent)  # the rename itself, made durable last
