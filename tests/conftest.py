"""Shared test helpers: tiny Gemma-2-shaped models written as real safetensors files."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from warpmerge.demo import DEMO_CONFIG, gemma2_shapes

# the demo's Gemma 2 config, smaller still
TINY = dict(DEMO_CONFIG, vocab_size=96, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=64,
            torch_dtype="float32")


def shapes(cfg: dict = TINY) -> dict[str, tuple[int, ...]]:
    return gemma2_shapes(cfg)


def random_model(seed: int, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes(cfg).items()}


def perturb(model: dict[str, torch.Tensor], seed: int, scale: float = 0.01,
            skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A checkpoint drifted from `model`; tensors named in `skip` stay exactly equal."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.items():
        noise = torch.randn(v.shape, generator=g)
        out[k] = v.clone() if k in skip else v + scale * noise
    return out


def write_model(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict = TINY,
                dtype: torch.dtype = torch.float32, shards: int = 1) -> Path:
    """Save as model.safetensors, or as `shards` files with an index, like transformers."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i * per:(i + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `warpmerge ARGS` in-process through the real entry point; (code, stdout, stderr)."""
    from warpmerge.cli import main

    monkeypatch.setattr(sys, "argv", ["warpmerge", *args])
    monkeypatch.delenv("WARPMERGE_DEBUG", raising=False)
    code = 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # main() installs its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


GOOD_CONFIG = """\
init: init
policies:
  - name: a
    checkpoints: run-a/step-*
  - name: b
    checkpoints: [run-b/step-1, run-b/step-2]
ema: {mu: 0.1, every: 2}
liti: {eta: [0.3, 1.0]}
output: {path: out, shard_size: 20KB}
"""


@pytest.fixture()
def setup(tmp_path: Path) -> Path:
    """A valid merge (init, runs a and b of two checkpoints) and its warp.yaml."""
    init = random_model(0)
    write_model(tmp_path / "init", init)
    for run in ("a", "b"):
        cur = init
        for t in (1, 2):
            cur = perturb(cur, 10 * ord(run) + t)
            write_model(tmp_path / f"run-{run}" / f"step-{t}", cur)
    (tmp_path / "warp.yaml").write_text(GOOD_CONFIG)
    return tmp_path


def write_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """A word-level tokenizer whose special tokens sit at Gemma's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        106: "<start_of_turn>",
        107: "<end_of_turn>",
    }
    words = ["user", "model", "hello", "world"] + [f"w{i}" for i in range(vocab_size)]
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        vocab[specials[i] if i in specials else words.pop(0)] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # newlines vanish; fine for a test
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tok.save(str(folder / "tokenizer.json"))
