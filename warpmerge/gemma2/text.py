"""Text around the model: the tokenizer, Gemma's chat format, decoding and stop tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from warpmerge.errors import InputError

from .config import END_OF_TURN_ID, EOS_ID, Gemma2Config

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_ROLES = {"user": "user", "assistant": "model", "model": "model"}


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


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as Gemma's chat template renders it, <bos> first.

    Gemma has no system role: a leading system message is folded into the first user turn
    (followed by a blank line). Turns must alternate user / assistant ("model"), starting with
    the user; contents are stripped of surrounding whitespace, as the template does.
    """
    prefix = ""
    if messages and messages[0].get("role") == "system":
        prefix = f"{messages[0].get('content', '')}\n\n"
        messages = messages[1:]
    parts = ["<bos>"]
    for i, message in enumerate(messages):
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InputError(f"chat message {i}: role {message.get('role')!r} is not "
                             "'system', 'user' or 'assistant'")
        if (role == "user") != (i % 2 == 0):
            raise InputError(f"chat message {i}: roles must alternate user/assistant, "
                             "starting with user")
        content = (prefix if i == 0 else "") + str(message.get("content", ""))
        parts.append(f"<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


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
