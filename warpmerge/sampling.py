"""The front's prompts: reading the prompts file and rendering each record for a model.

A record is `{"prompt": <string or list of {role, content}>, ...other fields}`; the other
fields are kept for a reward function, which receives them by name (as TRL's do).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

GENERATION_PROMPT = "<start_of_turn>model\n"


@dataclass
class PromptRecord:
    where: str  # "prompts.jsonl:3": how errors name this record
    prompt: str | list[dict[str, str]]
    fields: dict[str, Any] = field(default_factory=dict)


def read_prompt_records(path: Path) -> list[PromptRecord]:
    """JSON Lines (one record per line), or a JSON / YAML list of records."""
    if not path.is_file():
        raise InputError(f"{path}: prompts file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the prompts ({err})") from None
    records: list[PromptRecord] = []
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml  # YAML is a superset of JSON

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"{path.name}: cannot parse the prompts ({err})") from None
        if not isinstance(data, list):
            raise InputError(f"{path.name}: expected a list of records with a 'prompt'")
        records = [record_from(item, f"{path.name}[{i}]") for i, item in enumerate(data)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                item = json.loads(line)
            except ValueError as err:
                raise InputError(f"{where}: not a JSON record ({err})") from None
            records.append(record_from(item, where))
    if not records:
        raise InputError(f"{path.name}: no prompts in file")
    return records


def record_from(item: Any, where: str) -> PromptRecord:
    """One record, checked: a string prompt or a list of {role, content} messages."""
    if not isinstance(item, dict) or "prompt" not in item:
        raise InputError(f"{where}: expected a record with a 'prompt' field")
    prompt = item["prompt"]
    if isinstance(prompt, list):
        for message in prompt:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise InputError(f"{where}: chat messages need a 'role' and a 'content' string")
        if not prompt:
            raise InputError(f"{where}: the prompt has no messages")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
    return PromptRecord(where, prompt, {k: v for k, v in item.items() if k != "prompt"})


def prompt_text(record: PromptRecord) -> str:
    """The text the policy continues: one user turn, or the chat, then the model's turn."""
    if isinstance(record.prompt, str):
        return f"<bos><start_of_turn>user\n{record.prompt}<end_of_turn>\n{GENERATION_PROMPT}"
    from .gemma2 import render_chat

    text = render_chat(record.prompt)
    return text if text.endswith(GENERATION_PROMPT) else text + GENERATION_PROMPT


def reward_text(record: PromptRecord, completion: str) -> str:
    """What a Gemma 2 reward model scores: the conversation with the completion as last turn."""
    return f"{prompt_text(record)}{completion}<end_of_turn>\n"


def encode_prompt(tokenizer: Tokenizer, record: PromptRecord) -> list[int]:
    """Token ids of `prompt_text` (the Gemma markers are added tokens: one id each)."""
    return list(tokenizer.encode(prompt_text(record), add_special_tokens=False).ids)


def parameter_count(folder: Path) -> int:
    """Elements in a folder's safetensors files, read from their headers only."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
