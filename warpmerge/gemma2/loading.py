"""Loading Gemma 2 checkpoints: which tensor goes where, and the copy into the parameters.

A model is built on the `meta` device (no random init), its parameters are allocated empty in
the storage dtype, and each checkpoint tensor is copied (converting dtype) from its view on the
memory-mapped file, one at a time: peak memory is the model plus one tensor, never two models.
Files are read through `warpmerge.modelfolder.open_checkpoint`, which checks headers, the index and
that every file stays inside the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from warpmerge.errors import ConfigError, InputError
from warpmerge.modelfolder import Checkpoint, open_checkpoint

from .config import Gemma2Config
from .model import Gemma2, Gemma2RewardModel

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm")

# checkpoint tensor name -> (our parameter, first row in it, the tensor's shape)
Layout = dict[str, tuple[str, int, tuple[int, ...]]]


def checkpoint_layout(config: Gemma2Config, head: str | None = None) -> Layout:
    """Where each checkpoint tensor lands: `head` is None (tied LM head), "lm_head" or "score".

    Names are those of the released files; q/k/v and gate/up land in row blocks of the fused
    qkv_proj and gate_up_proj parameters, everything else maps one to one.
    """
    c = config
    H, F, d = c.hidden_size, c.intermediate_size, c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    layout: Layout = {"model.embed_tokens.weight": ("model.embed_tokens.weight", 0,
                                                    (c.vocab_size, H))}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        layout[p + "self_attn.q_proj.weight"] = (qkv, 0, (nh * d, H))
        layout[p + "self_attn.k_proj.weight"] = (qkv, nh * d, (nkv * d, H))
        layout[p + "self_attn.v_proj.weight"] = (qkv, (nh + nkv) * d, (nkv * d, H))
        layout[p + "self_attn.o_proj.weight"] = (p + "self_attn.o_proj.weight", 0, (H, nh * d))
        layout[p + "mlp.gate_proj.weight"] = (gate_up, 0, (F, H))
        layout[p + "mlp.up_proj.weight"] = (gate_up, F, (F, H))
        layout[p + "mlp.down_proj.weight"] = (p + "mlp.down_proj.weight", 0, (H, F))
        for norm in _NORMS:
            layout[f"{p}{norm}.weight"] = (f"{p}{norm}.weight", 0, (H,))
    layout["model.norm.weight"] = ("model.norm.weight", 0, (H,))
    if head == "lm_head":
        layout["lm_head.weight"] = ("lm_head.weight", 0, (c.vocab_size, H))
    elif head == "score":
        layout["score.weight"] = ("score.weight", 0, (c.num_labels, H))
    return layout


def checkpoint_shapes(
    config: Gemma2Config, separate_head: bool = False
) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in the released files' order (lm_head only if separate)."""
    layout = checkpoint_layout(config, "lm_head" if separate_head else None)
    return {name: shape for name, (_, _, shape) in layout.items()}


def default_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 for half-precision weights on a CPU, else the weights' own dtype.

    CPUs without bf16/fp16 matrix units multiply half-precision matrices several times slower
    than float32 ones; casting each weight block to float32 first is faster and more accurate.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def load_causal_lm(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> Gemma2:
    """A Gemma2ForCausalLM folder as `Gemma2`, weights stored in `dtype` on `device`."""
    config, ckpt = _open(folder, dtype)
    try:
        separate_head = "lm_head.weight" in ckpt.tensors
        if not separate_head and not config.tie_word_embeddings:
            raise InputError(f"{ckpt.path}: tie_word_embeddings is false but lm_head.weight "
                             "is missing")
        with torch.device("meta"):
            model = Gemma2(config, separate_head=separate_head)
        layout = checkpoint_layout(config, "lm_head" if separate_head else None)
        _fill(model, ckpt, layout, dtype, torch.device(device))
    finally:
        ckpt.close()
    model.model.compute_dtype = compute_dtype or default_compute_dtype(dtype, model.device)
    return model


def load_reward_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> Gemma2RewardModel:
    """A Gemma2ForSequenceClassification folder with one label as `Gemma2RewardModel`."""
    config, ckpt = _open(folder, dtype)
    try:
        if config.num_labels != 1:
            raise InputError(f"{ckpt.path / 'config.json'}: num_labels is {config.num_labels}; "
                             "a reward model has 1 (id2label with one entry)")
        with torch.device("meta"):
            model = Gemma2RewardModel(config)
        _fill(model, ckpt, checkpoint_layout(config, "score"), dtype, torch.device(device))
    finally:
        ckpt.close()
    model.model.compute_dtype = compute_dtype or default_compute_dtype(dtype, torch.device(device))
    return model


def _open(folder: str | Path, dtype: torch.dtype) -> tuple[Gemma2Config, Checkpoint]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder does not exist")
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype} (float32, bfloat16 or float16)")
    config = Gemma2Config.from_folder(folder)
    return config, open_checkpoint(folder, str(folder))


def _fill(
    model: nn.Module, ckpt: Checkpoint, layout: Layout, dtype: torch.dtype, device: torch.device
) -> None:
    """Allocate the meta-device `model`'s parameters and copy the checkpoint into them."""
    missing = [name for name in layout if name not in ckpt.tensors]
    if missing:
        raise InputError(f"{ckpt.path}: tensor {missing[0]} is missing ({len(missing)} missing)")
    unexpected = sorted(
        name for name in ckpt.tensors if name not in layout and not name.endswith("inv_freq")
    )
    if unexpected:
        raise InputError(f"{ckpt.path}: unexpected tensor {unexpected[0]} for this config")
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, pname, nn.Parameter(empty, requires_grad=False))
    params = dict(model.named_parameters())
    for name, info in ckpt.tensors.items():  # in file order: the page cache reads ahead
        if name not in layout:
            continue
        target, row, shape = layout[name]
        if info.shape != shape:
            raise InputError(f"{ckpt.path}: {name} has shape {list(info.shape)}, config.json "
                             f"implies {list(shape)}")
        params[target][row : row + shape[0]].copy_(ckpt.read(info, 0, info.numel).view(shape))
    model.eval()
