"""Gemma2Config: the hyper-parameters of the forward pass, read from a checkpoint's config.json.

The schema is declarative (pydantic); one `before` step maps the layouts seen in the wild onto
it: the 2024 release files (top-level `rope_theta`, `torch_dtype`, `hidden_act`, no
`layer_types`) and the files transformers 5 writes (`rope_parameters`, `dtype`, `layer_types`).
Missing keys take transformers' `Gemma2Config` defaults, so a file transformers accepts means the
same thing here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from warpmerge.errors import InputError

# Token ids of the Gemma 2 vocabulary (fixed by the released tokenizer).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107
DEFAULT_STOP_IDS: tuple[int, ...] = (EOS_ID, END_OF_TURN_ID)  # what ends an -it model's turn

SLIDING, FULL = "sliding_attention", "full_attention"
ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification")

Count = Annotated[int, Field(gt=0, strict=True)]
Positive = Annotated[float, Field(gt=0, strict=True)]
TokenId = Annotated[int, Field(ge=0, strict=True)]
Activation = Literal["gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast", "gelu"]

# Keys whose null means "the default" (the caps and the window keep null: "not applied").
_NULL_IS_DEFAULT = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "bos_token_id", "pad_token_id",
    "tie_word_embeddings", "hidden_activation", "layer_types",
)


class Gemma2Config(BaseModel):
    """What the forward pass needs to know about a Gemma 2 checkpoint."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    vocab_size: Count = 256000
    hidden_size: Count = 2304
    intermediate_size: Count = 9216
    num_hidden_layers: Count = 26
    num_attention_heads: Count = 8
    num_key_value_heads: Count = 4
    head_dim: Count = 256
    query_pre_attn_scalar: Positive = 256.0
    sliding_window: Count | None = 4096
    layer_types: tuple[Literal["sliding_attention", "full_attention"], ...] = ()
    attn_logit_softcapping: Positive | None = 50.0
    final_logit_softcapping: Positive | None = 30.0
    rope_type: Literal["default"] = "default"
    rope_theta: Positive = 10000.0
    rms_norm_eps: Positive = 1e-6
    hidden_activation: Activation = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = Field(True, strict=True)
    attention_bias: Literal[False] = False  # Gemma 2 has no biases
    use_bidirectional_attention: Literal[False] = False
    bos_token_id: TokenId = BOS_ID
    eos_token_ids: tuple[TokenId, ...] = (EOS_ID,)
    pad_token_id: TokenId = PAD_ID
    num_labels: Count = 2  # outputs of a sequence-classification (reward) head
    dtype: str | None = None  # the dtype the checkpoint says it was saved in, if any

    @model_validator(mode="before")
    @classmethod
    def _read_layouts(cls, raw: Any) -> Any:
        """Map both config.json layouts onto the fields above."""
        if not isinstance(raw, dict):
            return raw
        model_type = raw.get("model_type", "gemma2")
        if model_type != "gemma2" and not set(raw.get("architectures") or ()) & set(ARCHITECTURES):
            raise ValueError(f"not a Gemma 2 config (model_type is {model_type!r}, expected "
                             "'gemma2')")
        values = {k: v for k, v in raw.items() if not (k in _NULL_IS_DEFAULT and v is None)}
        rope = values.pop("rope_parameters", None) or values.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        values["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "hidden_activation" not in values and raw.get("hidden_act") is not None:
            values["hidden_activation"] = raw["hidden_act"]
        if "eos_token_id" in values:
            eos = values.pop("eos_token_id")
            values["eos_token_ids"] = () if eos is None else eos if isinstance(eos, list) else [eos]
        values["dtype"] = raw.get("dtype") or raw.get("torch_dtype")
        if isinstance(raw.get("id2label"), dict):
            values["num_labels"] = len(raw["id2label"])
        values["attention_bias"] = bool(values.get("attention_bias"))
        values["use_bidirectional_attention"] = bool(values.get("use_bidirectional_attention"))
        if not values.get("layer_types"):
            # 2024 release files have no layer_types: even layers slide, odd ones see everything.
            layers = values.get("num_hidden_layers", cls.model_fields["num_hidden_layers"].default)
            if isinstance(layers, int):
                values["layer_types"] = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        return values

    @model_validator(mode="after")
    def _consistent(self) -> Gemma2Config:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list 'sliding_attention' or 'full_attention' "
                             "once per layer")
        return self

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING and self.sliding_window is not None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Gemma2Config:
        """Validate a parsed config.json; errors are one line naming `source` and the key."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            if key:
                message = f"{key}: {message} (got {first['input']!r})"
            raise InputError(f"{source}: {message}") from None

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
