"""The Gemma 2 network in plain PyTorch: building blocks, the causal LM and the reward model.

The computation follows Hugging Face transformers' eager `Gemma2ForCausalLM` operation for
operation (see the project's Gemma 2 spec), so float32 logits agree with it to rounding noise
and bfloat16 logits (computed in bfloat16) to a bf16 ulp or so.

Two dtypes: the *storage* dtype of the parameters (the checkpoint's memory) and the *compute*
dtype of the activations. They differ when bfloat16 weights are computed in float32 (CPUs without
bf16 units multiply bf16 matrices ~8x slower than fp32 ones): each weight matrix is then cast a
block of rows at a time, just before its product, so the model stays bfloat16-sized in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_STOP_IDS, Gemma2Config

CAST_BLOCK = 1 << 22  # elements of a weight cast to the compute dtype at once (16 MiB in fp32)
NARROW_ROWS = 4  # up to this many rows, a product runs in the weight's own (narrower) dtype


class Linear(nn.Linear):
    """A bias-free projection whose weight may be stored in a narrower dtype than `x`.

    Casting a block of rows at a time bounds the temporary copy (the tied head of a 27B model is
    4.7 GB in float32) while keeping each product a large matrix multiplication.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.weight)


def project(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T in x's dtype, casting `weight` block by block when its dtype differs.

    A product with a few rows (a decoding step) is bound by reading the weight, not by
    arithmetic: there the weight is read as stored and `x` rounded to its dtype instead, which
    is what an all-bf16 model does, and ~1.7x faster than casting the weight first.
    """
    if weight.dtype == x.dtype:
        return F.linear(x, weight)
    if x.numel() <= NARROW_ROWS * x.shape[-1]:
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)
    rows = max(1, CAST_BLOCK // weight.shape[1])
    if rows >= weight.shape[0]:
        return F.linear(x, weight.to(x.dtype))
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for first in range(0, weight.shape[0], rows):
        block = weight[first : first + rows]
        out[..., first : first + block.shape[0]] = F.linear(x, block.to(x.dtype))
    return out


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


@dataclass(frozen=True)
class KeyRange:
    """The cached keys one kind of layer reads in a forward call, and the mask over them.

    `mask` is additive, [T, keys]: 0 where a query may see a key, finfo.min elsewhere; None when
    every key is visible (a single query whose range was already cut to what it may see).
    """

    first: int
    mask: Tensor | None


@dataclass(frozen=True)
class Chunk:
    """What every layer of one forward call shares: where the tokens sit and what they see.

    Built once per call, so that masks and RoPE tables are not rebuilt in every layer.
    """

    start: int  # position of the first token
    cos: Tensor
    sin: Tensor
    full: KeyRange
    sliding: KeyRange

    @classmethod
    def at(
        cls, config: Gemma2Config, start: int, length: int, dtype: torch.dtype,
        device: torch.device,
    ) -> Chunk:
        end = start + length
        cos, sin = rope_cos_sin(config, torch.arange(start, end, device=device), dtype)
        full = KeyRange(0, attention_mask(start, end, 0, None, dtype, device))
        window = config.sliding_window
        if window is None:
            return cls(start, cos, sin, full, full)
        first = max(0, start - window + 1)  # sliding layers only read what a query may see
        sliding = KeyRange(first, attention_mask(start, end, first, window, dtype, device))
        return cls(start, cos, sin, full, sliding)


def attention_mask(
    start: int, end: int, first_key: int, window: int | None, dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """Additive mask [end - start, end - first_key] for queries start..end-1.

    Query at absolute position q sees key k iff k <= q and, in sliding layers, q - W < k.
    """
    if end - start == 1:
        return None
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(first_key, end, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class KVCache(nn.Module):
    """Preallocated keys and values of every layer, [layers, B, nkv, max_len, d] each.

    Static buffers avoid re-allocating and copying a growing cache at every decoded token.
    Sliding layers keep all positions too (a sliding layer just reads its last W), which is
    cheap for the short generations the check runs.
    """

    def __init__(
        self,
        config: Gemma2Config,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device))
        self.max_len = max_len
        self.length = 0  # positions filled so far (the next token's position)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a chunk's k, v [B, nkv, T, d] at positions length..; return all keys so far.

        The length itself advances once every layer has stored the chunk (`advance`).
        """
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens


class Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.sliding = c.is_sliding(layer)
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.n_heads, self.n_kv, self.head_dim = nh, nkv, d
        self.scaling = c.query_pre_attn_scalar**-0.5
        self.softcap = c.attn_logit_softcapping
        # The checkpoint's q_proj, k_proj and v_proj stacked row-wise: one matrix product instead
        # of three. Each output element is still the same dot product (bit-identical in tests).
        self.qkv_proj = Linear(c.hidden_size, (nh + 2 * nkv) * d)
        self.o_proj = Linear(nh * d, c.hidden_size)

    def forward(self, x: Tensor, chunk: Chunk, cache: KVCache | None) -> Tensor:
        """x [B, T, H] -> [B, T, H]; with a cache, attends to the cached keys as well."""
        B, T, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        keys = chunk.sliding if self.sliding else chunk.full
        q, k, v = self.qkv_proj(x).split((nh * d, nkv * d, nkv * d), dim=-1)
        q = apply_rope(q.view(B, T, nh, d).transpose(1, 2), chunk.cos, chunk.sin)
        k = apply_rope(k.view(B, T, nkv, d).transpose(1, 2), chunk.cos, chunk.sin)
        v = v.view(B, T, nkv, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            k, v = k[:, :, keys.first :], v[:, :, keys.first :]
        else:
            # Views into the fused projection are strided; CPU bfloat16 batched matmul is ~4x
            # slower on them than on contiguous copies (which are small next to the scores).
            k, v = k.contiguous(), v.contiguous()
        # Grouped-query attention without copying k/v per query head: query head j uses kv head
        # j // g, so the g query heads of one kv head are stacked along the row axis.
        g = nh // nkv
        scores = torch.matmul(q.reshape(B, nkv, g * T, d), k.transpose(-1, -2))
        scores.mul_(self.scaling)
        if self.softcap is not None:  # soft cap before the mask, as the model was trained
            scores.div_(self.softcap).tanh_().mul_(self.softcap)
        if keys.mask is not None:
            scores.view(B, nkv, g, T, -1).add_(keys.mask)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.matmul(probs, v)  # [B, nkv, g*T, d] == [B, nh, T, d]
        return self.o_proj(out.view(B, nh, T, d).transpose(1, 2).reshape(B, T, nh * d))


class MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        # gate_proj and up_proj stacked row-wise, for the same reason as qkv_proj.
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "none" if config.hidden_activation == "gelu" else "tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate).mul_(up))


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

    def forward(self, x: Tensor, chunk: Chunk, cache: KVCache | None) -> Tensor:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), chunk, cache)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    """The transformer body, up to and including the final norm.

    Parameter names follow the checkpoint's `model.*` tensors, except the fused qkv_proj and
    gate_up_proj (see `loading.checkpoint_layout`).
    """

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype: torch.dtype | None = None  # None: the parameters' dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the activations, the KV cache and the outputs."""
        return self.compute_dtype or self.embed_tokens.weight.dtype

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Normed hidden states [B, T, H] of `input_ids` [B, T].

        With a cache, the tokens continue the cached sequence: their keys/values are written at
        positions cache.length.. and the cache length advances.
        """
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, need {start + T}")
        dt = self.dtype
        chunk = Chunk.at(self.config, start, T, dt, input_ids.device)
        x = F.embedding(input_ids, self.embed_tokens.weight).to(dt)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=dt)  # normalizer rounded to dt
        for layer in self.layers:
            x = layer(x, chunk, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class Gemma2(nn.Module):
    """Gemma 2 causal LM. `model(input_ids)` returns logits [B, T, V] in the compute dtype."""

    def __init__(self, config: Gemma2Config, separate_head: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        # The released checkpoints tie the head to the embedding and do not store lm_head.
        self.lm_head = Linear(config.hidden_size, config.vocab_size) if separate_head else None

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype | None = None,
    ) -> Gemma2:
        """Load a model folder; see `loading.load_causal_lm` (compute_dtype None: the fast one)."""
        from .loading import load_causal_lm  # loading builds these classes: imported late

        return load_causal_lm(folder, dtype, device, compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the logits and the KV cache)."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for `input_ids` [B, T] (or [T])."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        x = self.model(input_ids, cache)
        if last_only:
            x = x[:, -1:]
        head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        logits = project(x, head)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    def log_probs(self, input_ids: Tensor) -> Tensor:
        """log softmax of the next-token logits at every position, [B, T, V], in float32."""
        return torch.log_softmax(self(input_ids).float(), dim=-1)

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_ids: Iterable[int] = DEFAULT_STOP_IDS,
    ) -> Tensor:
        """New tokens after `input_ids`, greedy by default; see `generate.generate`."""
        from .generate import generate  # generate drives this class: imported late

        return generate(self, input_ids, max_new_tokens, temperature, top_k, generator, stop_ids)


class Gemma2RewardModel(nn.Module):
    """Gemma 2 reward model (Gemma2ForSequenceClassification): one score per sequence.

    The score head reads the normed hidden state at each row's last real token; the final logit
    soft cap belongs to the LM head and is not applied.
    """

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.score = Linear(config.hidden_size, config.num_labels)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype | None = None,
    ) -> Gemma2RewardModel:
        """Load a reward model folder (num_labels must be 1); see `loading.load_reward_model`."""
        from .loading import load_reward_model

        return load_reward_model(folder, dtype, device, compute_dtype)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores [B] in float32 for right-padded `input_ids` [B, T] (or [T]).

        Each row is read at the last position where `attention_mask` is 1 (the last position
        when there is no mask). Causal attention means padding after it cannot change it.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            positions = torch.arange(T, device=input_ids.device)
            last = torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)
            if bool((last < 0).any()):
                raise ValueError("attention_mask has a row with no real token")
        hidden = self.model(input_ids)[torch.arange(B, device=input_ids.device), last]
        # The head is a single row: cast it whole, so that few rows still score in float32.
        return F.linear(hidden, self.score.weight.to(hidden.dtype))[:, 0].float()
