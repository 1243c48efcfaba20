"""A small, exact Gemma 2 forward pass in plain PyTorch, used to check and score models.

Why bundle one instead of calling transformers: `warpmerge check` must run wherever warpmerge
runs (transformers is only a test dependency), must load a checkpoint without ever holding two
copies of it in memory, and must be fast on a CPU.

    config.py    Gemma2Config, read from config.json (both layouts in the wild)
    model.py     the network: RMSNorm, RoPE, attention, MLP, layers, KVCache, the two models
    loading.py   checkpoint tensor names and shapes; from_pretrained's weight copying
    generate.py  sampling and generation with the KV cache
    text.py      tokenizer, Gemma's chat format, decoding

    from warpmerge.gemma2 import Gemma2, Gemma2RewardModel
    model = Gemma2.from_pretrained(folder, dtype=torch.bfloat16)   # computes in float32 on CPU
    logits = model(input_ids)                                       # [B, T, vocab]
    scores = Gemma2RewardModel.from_pretrained(rm_folder)(ids, attention_mask)   # [B]
"""

from .config import (
    BOS_ID,
    DEFAULT_STOP_IDS,
    END_OF_TURN_ID,
    EOS_ID,
    FULL,
    PAD_ID,
    SLIDING,
    START_OF_TURN_ID,
    UNK_ID,
    Gemma2Config,
)
from .generate import generate, next_token_probs, pick
from .loading import checkpoint_layout, checkpoint_shapes, default_compute_dtype
from .model import Gemma2, Gemma2RewardModel, KVCache
from .text import (
    decode,
    encode_instruction,
    load_tokenizer,
    render_chat,
    render_instruction,
    stop_ids_for,
)

__all__ = [
    "BOS_ID", "DEFAULT_STOP_IDS", "END_OF_TURN_ID", "EOS_ID", "FULL", "PAD_ID", "SLIDING",
    "START_OF_TURN_ID", "UNK_ID", "Gemma2", "Gemma2Config", "Gemma2RewardModel", "KVCache",
    "checkpoint_layout", "checkpoint_shapes", "decode", "default_compute_dtype",
    "encode_instruction", "generate", "load_tokenizer", "next_token_probs", "pick",
    "render_chat", "render_instruction", "stop_ids_for",
]
