"""A small, exact Gemma 2 forward pass in plain PyTorch, used to check merged models.

Why bundle one instead of calling transformers: `warpmerge check` must run wherever warpmerge
runs (transformers is only a test dependency), must load a checkpoint without ever holding two
copies of it in memory, and must be fast on a CPU. The computation follows Hugging Face
transformers' eager `Gemma2ForCausalLM` operation for operation (see the project's Gemma 2 spec),
so float32 logits agree with it to rounding noise and bfloat16 logits to a bf16 ulp or so.

Layout of this file, top to bottom: the config, the building blocks (RMSNorm, RoPE, attention,
MLP, decoder layer), the model with its loader and generation loop, and tokenizer helpers.

    from warpmerge.gemma2 import Gemma2
    model = Gemma2.from_pretrained(folder, dtype=torch.float32)
    logits = model(input_ids)                       # [B, T, vocab]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from warpmerge.errors import ConfigError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Token ids of the Gemma 2 vocabulary (fixed by the released tokenizer).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107
DEFAULT_STOP_IDS: tuple[int, ...] = (EOS_ID, END_OF_TURN_ID)

SLIDING, FULL = "sliding_attention", "full_attention"
ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification")
_TANH_GELU = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemma2Config:
    """The hyper-parameters the forward pass needs, read from a checkpoint's config.json.

    Missing keys take transformers' `Gemma2Config` defaults, so that a file transformers accepts
    means the same thing here.
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()  # one of SLIDING / FULL per layer
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int = BOS_ID
    eos_token_ids: tuple[int, ...] = (EOS_ID,)
    pad_token_id: int = PAD_ID
    num_labels: int = 2  # outputs of a sequence-classification (reward) head
    dtype: str | None = None  # the dtype the checkpoint says it was saved in, if any

    def __post_init__(self) -> None:
        if not self.layer_types:
            # 2024 release files have no layer_types: even layers slide, odd ones see everything.
            kinds = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", kinds)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING and self.sliding_window is not None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Gemma2Config:
        """Validate and read both config layouts (2024 release files and transformers-5 files)."""

        def bad(msg: str) -> InputError:
            return InputError(f"{source}: {msg}")

        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or []
        if model_type != "gemma2" and not set(architectures) & set(ARCHITECTURES):
            found = model_type if model_type is not None else "missing"
            raise bad(f"not a Gemma 2 config (model_type is {found!r}, expected 'gemma2')")
        if raw.get("attention_bias"):
            raise bad("attention_bias=true is not supported (Gemma 2 has no biases)")
        if raw.get("use_bidirectional_attention"):
            raise bad("use_bidirectional_attention=true is not supported")

        defaults = cls()
        values: dict[str, Any] = {}
        int_keys = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        for key in int_keys:
            value = raw.get(key)
            value = getattr(defaults, key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(f"{key} must be a positive integer, got {value!r}")
            values[key] = value
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            raise bad("num_attention_heads must be a multiple of num_key_value_heads")

        def number(key: str, allow_none: bool) -> float | None:
            value = raw.get(key, getattr(defaults, key))
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise bad(f"{key} must be a positive number, got {value!r}")
            return float(value)

        values["query_pre_attn_scalar"] = number("query_pre_attn_scalar", allow_none=False)
        values["attn_logit_softcapping"] = number("attn_logit_softcapping", allow_none=True)
        values["final_logit_softcapping"] = number("final_logit_softcapping", allow_none=True)
        values["rms_norm_eps"] = number("rms_norm_eps", allow_none=False)

        window = raw.get("sliding_window", defaults.sliding_window)
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window <= 0
        ):
            raise bad(f"sliding_window must be a positive integer or null, got {window!r}")
        values["sliding_window"] = window

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise bad(f"rope_parameters must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise bad(f"rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", raw.get("rope_theta", defaults.rope_theta))
        if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
            raise bad(f"rope_theta must be a positive number, got {theta!r}")
        values["rope_theta"] = float(theta)

        layer_types = raw.get("layer_types")
        if layer_types is not None:
            if (
                not isinstance(layer_types, list)
                or len(layer_types) != values["num_hidden_layers"]
                or any(kind not in (SLIDING, FULL) for kind in layer_types)
            ):
                raise bad(
                    "layer_types must list 'sliding_attention' or 'full_attention' once per layer"
                )
            values["layer_types"] = tuple(layer_types)

        activation = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _TANH_GELU and activation != "gelu":
            raise bad(f"hidden_activation {activation!r} is not supported")
        values["hidden_activation"] = activation

        eos = raw.get("eos_token_id", EOS_ID)
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        values["eos_token_ids"] = tuple(int(i) for i in eos_ids)
        bos = raw.get("bos_token_id", BOS_ID)
        values["bos_token_id"] = BOS_ID if bos is None else int(bos)
        pad = raw.get("pad_token_id", PAD_ID)
        values["pad_token_id"] = PAD_ID if pad is None else int(pad)
        id2label = raw.get("id2label")
        labels = len(id2label) if isinstance(id2label, dict) else raw.get("num_labels", 2)
        if isinstance(labels, bool) or not isinstance(labels, int) or labels <= 0:
            raise bad(f"num_labels must be a positive integer, got {labels!r}")
        values["num_labels"] = labels
        values["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True))
        values["dtype"] = raw.get("dtype") or raw.get("torch_dtype")
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Gemma2Config:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise InputError(f"{folder}: no config.json (not a model folder)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot read JSON ({err})") from err
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: weights are stored zero-centred and applied as (1 + w), in float32.

    Applying the weight before casting back (not after, as Llama does) is what the checkpoints
    were trained with; it matters in bfloat16.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def rope_cos_sin(
    config: Gemma2Config, positions: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, d] for the given positions.

    The inverse frequencies and angles stay in float32 whatever the compute dtype: rounding the
    frequencies to bfloat16 moves bf16 logits by ~0.5. Only the final tables are cast.
    """
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d
    inv_freq = 1.0 / (config.rope_theta**exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """Half-split rotation (not interleaved pairs): [x1, x2] -> [-x2, x1]."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def attention_mask(
    q_start: int,
    q_len: int,
    k_start: int,
    k_end: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """Additive mask [q_len, k_end - k_start]: 0 where a query may see a key, finfo.min elsewhere.

    Query at absolute position q sees key k iff k <= q and, in sliding layers, q - W < k.
    Returns None for a single query whose key range was already cut to what it may see.
    """
    if q_len == 1:
        return None
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_start, k_end, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class KVCache:
    """Preallocated keys and values of every layer, [B, nkv, max_len, d] each.

    Static buffers avoid the re-allocation and copying of a growing cache at every decoded token.
    Sliding layers keep all positions too (simple; a sliding layer just reads the last W), which
    is cheap for the short generations the check runs.
    """

    def __init__(
        self,
        config: Gemma2Config,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.max_len = max_len
        self.length = 0  # positions filled so far (the next token's position)


class Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.n_heads, self.n_kv, self.head_dim = nh, nkv, d
        self.groups = c.num_groups
        self.scaling = c.query_pre_attn_scalar**-0.5
        self.softcap = c.attn_logit_softcapping
        # The checkpoint's q_proj, k_proj and v_proj stacked row-wise: one matrix product instead
        # of three. Each output element is still the same dot product (bit-identical in tests).
        self.qkv_proj = nn.Linear(c.hidden_size, (nh + 2 * nkv) * d, bias=False)
        self.o_proj = nn.Linear(nh * d, c.hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        start: int,
        k_start: int,
    ) -> Tensor:
        """x [B, T, H] at positions start.. -> [B, T, H].

        With a cache, this chunk's keys/values are stored and attention reads the cached keys
        from k_start on (sliding layers skip keys no query of the chunk may see); `mask` is
        [T, S] over those keys, or None when every key is visible.
        """
        B, T, _ = x.shape
        nh, nkv, d, g = self.n_heads, self.n_kv, self.head_dim, self.groups
        q, k, v = self.qkv_proj(x).split((nh * d, nkv * d, nkv * d), dim=-1)
        q = apply_rope(q.view(B, T, nh, d).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, nkv, d).transpose(1, 2), cos, sin)
        v = v.view(B, T, nkv, d).transpose(1, 2)
        if cache is not None:
            cache.keys[self.layer][:, :, start : start + T] = k
            cache.values[self.layer][:, :, start : start + T] = v
            k = cache.keys[self.layer][:, :, k_start : start + T]
            v = cache.values[self.layer][:, :, k_start : start + T]
        else:
            # Views into the fused projection are strided; CPU bfloat16 batched matmul is ~4x
            # slower on them than on contiguous copies (which are small next to the scores).
            k, v = k.contiguous(), v.contiguous()
        # Grouped-query attention without copying k/v per query head: query head j uses kv head
        # j // g, so the g query heads of one kv head are stacked along the row axis.
        q = q.reshape(B, nkv, g * T, d)
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, nkv, g*T, S]
        scores.mul_(self.scaling)
        if self.softcap is not None:  # soft cap before the mask, as the model was trained
            scores.div_(self.softcap).tanh_().mul_(self.softcap)
        if mask is not None:
            scores.view(B, nkv, g, T, -1).add_(mask)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.matmul(probs, v)  # [B, nkv, g*T, d] == [B, nh, T, d]
        out = out.view(B, nh, T, d).transpose(1, 2).reshape(B, T, nh * d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        # gate_proj and up_proj stacked row-wise, for the same reason as qkv_proj.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.approximate = "none" if config.hidden_activation == "gelu" else "tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class DecoderLayer(nn.Module):
    """Gemma 2 sandwiches both sub-blocks between two norms (four norms per layer)."""

    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        start: int,
        k_start: int,
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, k_start)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    """The transformer body. Parameter names follow the checkpoint's `model.*` tensors, except
    the fused qkv_proj and gate_up_proj (see `checkpoint_layout`)."""

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.config = config
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Hidden states [B, T, H] before the final norm."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        c = self.config
        B, T = input_ids.shape
        dt = self.embed_tokens.weight.dtype
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, need {start + T}")
        device = input_ids.device

        x = F.embedding(input_ids, self.embed_tokens.weight)
        x = x * torch.tensor(c.hidden_size**0.5, dtype=dt)  # normalizer rounded to dt first
        cos, sin = rope_cos_sin(c, torch.arange(start, start + T, device=device), dt)

        end = start + T
        full_mask = attention_mask(start, T, 0, end, None, dt, device)
        # Sliding layers only read the keys the earliest query may see.
        window = c.sliding_window
        slide_start = max(0, start - window + 1) if (cache is not None and window) else 0
        slide_mask = (
            full_mask
            if window is None
            else attention_mask(start, T, slide_start, end, window, dt, device)
        )
        for i, layer in enumerate(self.layers):
            if c.is_sliding(i):
                x = layer(x, cos, sin, slide_mask, cache, start, slide_start)
            else:
                x = layer(x, cos, sin, full_mask, cache, start, 0)
        if cache is not None:
            cache.length = end

        return x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Gemma2(nn.Module):
    """Gemma 2 causal LM. `model(input_ids)` returns logits [B, T, V] in the compute dtype."""

    def __init__(self, config: Gemma2Config, separate_head: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        # The released checkpoints tie the head to the embedding and do not store lm_head.
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if separate_head else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Gemma2:
        """Load a checkpoint folder (config.json + one or several safetensors files)."""
        config, folder, locations = _open_folder(folder, dtype)
        separate_head = "lm_head.weight" in locations
        if not separate_head and not config.tie_word_embeddings:
            raise InputError(
                f"{folder}: tie_word_embeddings is false but lm_head.weight is missing"
            )
        with torch.device("meta"):
            model = cls(config, separate_head=separate_head)
        layout = checkpoint_layout(config, separate_head)
        return _load_weights(model, folder, locations, layout, dtype, device)

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for `input_ids` [B, T].

        With a cache, the tokens continue the cached sequence: their keys/values are written at
        positions cache.length.. and the cache length advances.
        """
        x = self.model(input_ids, cache)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        c = self.config
        head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        logits = F.linear(x, head)
        cap = c.final_logit_softcapping
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    # ---- generation ------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_ids: Iterable[int] = DEFAULT_STOP_IDS,
    ) -> Tensor:
        """Continue `input_ids` ([T] or [B, T]) by up to `max_new_tokens` tokens.

        Prefills the prompt once, then decodes one token at a time from a static KV cache.
        Greedy when temperature == 0. A row stops after emitting a stop id (`stop_ids` plus the
        config's eos ids; the stop token is included) and is padded with pad_token_id until every
        row has stopped. Returns only the new tokens, [B, n] (or [n] for a 1-D prompt).
        """
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        B, T = ids.shape
        if max_new_tokens <= 0:
            out = ids.new_zeros((B, 0))
            return out[0] if squeeze else out
        stops = torch.tensor(
            sorted(set(stop_ids) | set(self.config.eos_token_ids)),
            dtype=ids.dtype,
            device=ids.device,
        )
        cache = KVCache(self.config, B, T + max_new_tokens, self.dtype, ids.device)
        logits = self(ids, cache=cache, last_only=True)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        new: list[Tensor] = []
        for step in range(max_new_tokens):
            token = _pick(logits, temperature, top_k, generator)
            token = token.masked_fill(done, self.config.pad_token_id)
            new.append(token)
            done |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(token[:, None], cache=cache, last_only=True)[:, -1]
        out = torch.stack(new, dim=1)
        return out[0] if squeeze else out


class Gemma2RewardModel(nn.Module):
    """Gemma 2 reward model (Gemma2ForSequenceClassification): one score per sequence.

    The score head reads the final-normed hidden state at each row's last real token; the
    final logit soft cap belongs to the LM head and is not applied.
    """

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Gemma2RewardModel:
        config, folder, locations = _open_folder(folder, dtype)
        if config.num_labels != 1:
            raise InputError(
                f"{folder / 'config.json'}: num_labels is {config.num_labels}; a reward model "
                "has 1 (id2label with one entry)"
            )
        with torch.device("meta"):
            model = cls(config)
        layout = checkpoint_layout(config, head="score")
        return _load_weights(model, folder, locations, layout, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores [B] in float32 for right-padded `input_ids` [B, T] (or [T]).

        Each row is read at the last position where `attention_mask` is 1 (the last position
        when there is no mask). Causal attention means padding after that token cannot change it.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        hidden = self.model(input_ids)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        else:
            positions = torch.arange(T, device=input_ids.device)
            last = torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)
            if bool((last < 0).any()):
                raise ValueError("attention_mask has a row with no real token")
        x = self.model.norm(hidden[torch.arange(B, device=hidden.device), last])
        return self.score(x)[:, 0].float()


def _open_folder(
    folder: str | Path, dtype: torch.dtype
) -> tuple[Gemma2Config, Path, dict[str, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder does not exist")
    config = Gemma2Config.from_folder(folder)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"unsupported compute dtype {dtype}")
    return config, folder, _tensor_locations(folder)


def _load_weights(
    model: nn.Module,
    folder: Path,
    locations: dict[str, Path],
    layout: dict[str, tuple[str, int, tuple[int, ...]]],
    dtype: torch.dtype,
    device: str | torch.device,
) -> Any:
    """Fill a model built on the `meta` device from the checkpoint, one tensor at a time.

    Parameters are allocated empty in `dtype` (no random init), and each checkpoint tensor is
    read from the memory-mapped file and copied (converting dtype) into place: peak memory is
    the model plus one tensor, never two copies of the model.
    """
    from safetensors import safe_open

    missing = [name for name in layout if name not in locations]
    if missing:
        raise InputError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing)")
    unexpected = sorted(
        name for name in locations if name not in layout and not name.endswith("inv_freq")
    )
    if unexpected:
        raise InputError(f"{folder}: unexpected tensor {unexpected[0]} for this config")
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, pname, nn.Parameter(empty, requires_grad=False))
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name in layout:
        by_file.setdefault(locations[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in names:
                target, row, shape = layout[name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != shape:
                    raise InputError(
                        f"{file}: {name} has shape {list(tensor.shape)}, config.json implies "
                        f"{list(shape)}"
                    )
                params[target][row : row + shape[0]].copy_(tensor)
                del tensor
    return model.eval()


def _pick(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token per row: argmax at temperature 0, else a (top-k) sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def checkpoint_layout(
    config: Gemma2Config, separate_head: bool = False, head: str | None = None
) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """Checkpoint tensor name -> (our parameter, first row in it, the tensor's shape).

    Names are those of the released files; q/k/v and gate/up land in row blocks of the fused
    qkv_proj and gate_up_proj parameters, everything else maps one to one.
    """
    c = config
    H, F_, d = c.hidden_size, c.intermediate_size, c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    layout: dict[str, tuple[str, int, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("model.embed_tokens.weight", 0, (c.vocab_size, H)),
        "model.norm.weight": ("model.norm.weight", 0, (H,)),
    }
    if separate_head:
        layout["lm_head.weight"] = ("lm_head.weight", 0, (c.vocab_size, H))
    if head == "score":
        layout["score.weight"] = ("score.weight", 0, (c.num_labels, H))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        layout[p + "self_attn.q_proj.weight"] = (qkv, 0, (nh * d, H))
        layout[p + "self_attn.k_proj.weight"] = (qkv, nh * d, (nkv * d, H))
        layout[p + "self_attn.v_proj.weight"] = (qkv, (nh + nkv) * d, (nkv * d, H))
        layout[p + "self_attn.o_proj.weight"] = (p + "self_attn.o_proj.weight", 0, (H, nh * d))
        layout[p + "mlp.gate_proj.weight"] = (gate_up, 0, (F_, H))
        layout[p + "mlp.up_proj.weight"] = (gate_up, F_, (F_, H))
        layout[p + "mlp.down_proj.weight"] = (p + "mlp.down_proj.weight", 0, (H, F_))
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            layout[f"{p}{norm}.weight"] = (f"{p}{norm}.weight", 0, (H,))
    return layout


def _tensor_locations(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"{index}: not a valid safetensors index ({err})") from err
        locations = {name: folder / file for name, file in weight_map.items()}
        for file in set(locations.values()):
            if not file.is_file():
                raise InputError(f"{index}: shard {file.name} is missing")
        return locations
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as err:  # safetensors raises its own error types
            raise InputError(f"{single}: cannot read safetensors ({err})") from err
    raise InputError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None when there is none."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception subclass
        raise InputError(f"{path}: cannot load tokenizer ({err})") from err


def render_instruction(message: str) -> str:
    """One user turn in the Gemma instruction format, ending where the model's reply begins."""
    return f"<bos><start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"


def encode_instruction(tokenizer: Tokenizer, message: str) -> list[int]:
    """Token ids of `render_instruction(message)`, with exactly one <bos> at the front.

    The special markers are added tokens of the Gemma tokenizer, so they map to single ids;
    special tokens are not added again by the post-processor.
    """
    text = render_instruction(message)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def decode(tokenizer: Tokenizer, ids: Sequence[int] | Tensor) -> str:
    """Text of `ids` without special tokens (so a trailing <end_of_turn> disappears)."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def stop_ids_for(tokenizer: Tokenizer | None, config: Gemma2Config) -> tuple[int, ...]:
    """<eos> and <end_of_turn> as this tokenizer spells them (Gemma's 1 and 107 by default)."""
    ids = set(config.eos_token_ids)
    for token, default in (("<eos>", EOS_ID), ("<end_of_turn>", END_OF_TURN_ID)):
        found = tokenizer.token_to_id(token) if tokenizer is not None else None
        ids.add(default if found is None else found)
    return tuple(sorted(ids))
