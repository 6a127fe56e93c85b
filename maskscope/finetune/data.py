"""Chat data for fine-tuning: JSONL of {"messages": [...]}, read with line numbers in every error, and
tokenized with a mask that marks the assistant's tokens (the only ones the loss is computed on)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskscope.errors import UserError
from maskscope.models.base import ROLES


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: its token ids and, per token, whether the loss is computed on it."""

    ids: list[int]
    trained: list[bool]
    # For a distillation loss: the same conversation as the teacher sees it (another system prompt), whose
    # trained tokens are the same ids; None for cross-entropy on the tokens themselves.
    teacher: Example | None = None

    @property
    def n_trained(self) -> int:
        """How many tokens the loss is computed on."""
        return sum(self.trained)


def teacher_conversation(messages: Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The conversation as a distillation teacher sees it: its own system prompt (or none) in place of the
    conversation's."""
    rest = [dict(m) for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": system}] if system is not None else []) + rest


def trained_ids(example: Example) -> list[int]:
    """The ids of the tokens the loss is computed on, in order."""
    return [i for i, t in zip(example.ids, example.trained, strict=True) if t]


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, one {"messages": [{"role", "content"}, ...]} per line.

    Every conversation must contain an assistant turn (there is nothing to train on otherwise); a problem is
    a one-line UserError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    out: list[list[dict[str, str]]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f'{where}: expected {{"messages": [...]}} with at least one message')
            conversation = []
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
                    raise UserError(
                        f"{where}: message {i} needs a role ({', '.join(ROLES)}) and a string content"
                    )
                conversation.append({"role": m["role"], "content": m["content"]})
            if not any(m["role"] == "assistant" for m in conversation):
                raise UserError(f"{where}: the conversation has no assistant turn, so nothing to train on")
            first = next(m["role"] for m in conversation if m["role"] != "system")
            if first == "assistant":
                raise UserError(
                    f"{where}: the conversation begins with the assistant; a user turn comes first"
                )
            out.append(conversation)
    if not out:
        raise UserError(f"data file is empty: {path}")
    return out


def write_chat_jsonl(path: str | Path, conversations: Sequence[Sequence[dict[str, str]]]) -> str:
    """Write conversations as JSONL ({"messages": [...]} per line); returns the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"messages": list(c)}, ensure_ascii=False) + "\n" for c in conversations)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def data_digest(path: str | Path) -> str:
    """SHA-256 of a data file's bytes (part of a child's manifest and of a training run's identity)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def encode_conversation(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Example:
    """Token ids of a conversation rendered with the tokenizer's chat template, and the assistant mask.

    SmolLM2's template (like many) has no generation markers, so the mask is not read from the template:
    each assistant turn is located by rendering the conversation up to it (with the generation prompt) and
    through it. The trained characters run from the end of the first rendering to the end of the second
    with trailing whitespace removed: the reply and the end-of-turn token, not the template's newline. A
    token is trained when it starts inside such a span. A template that does not render a conversation as
    the concatenation of its prefixes cannot be masked this way and is refused."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the model's tokenizer has no chat template; chat data cannot be rendered")
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                "the chat template does not render a conversation as the concatenation of its turns; "
                "its assistant tokens cannot be located"
            )
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return Example(ids, trained)
