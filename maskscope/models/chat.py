"""The text side of a model: its chat template and tokenizer, shared by every backend that renders prompts
locally (the transformers backend, and the OpenAI-compatible backend when it is given the model's tokenizer)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from maskscope.errors import UserError
from maskscope.models.base import Candidate, Context, Conversation, Seq


class ChatTokenizer:
    """Renders contexts with a tokenizer's chat template and splits prompts and continuations into tokens."""

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def template_digest(self) -> str:
        """A short hash of the chat template (part of every fingerprint: the template changes the prompt)."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return hashlib.sha256(str(template).encode()).hexdigest()[:16]

    def render(self, context: Context) -> str:
        """The prompt text: the chat template with the generation prompt, then the prefill verbatim.

        A raw string is used as it is (no template), for base models and hand-made prompts."""
        ctx = Conversation.coerce(context)
        if isinstance(ctx, str):
            return ctx
        if getattr(self.tokenizer, "chat_template", None) is None:
            # No template: a plain transcript, the convention of base-model evaluation.
            lines = [f"{m.role.capitalize()}: {m.content}" for m in ctx.messages]
            return "\n\n".join([*lines, "Assistant: "]) + ctx.prefill
        messages = [{"role": m.role, "content": m.content} for m in ctx.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + ctx.prefill

    def encode_prompt(self, context: Context) -> list[int]:
        """Token ids of the rendered prompt. Templated prompts carry their own special tokens."""
        ctx = Conversation.coerce(context)
        text = self.render(ctx)
        ids = self.tokenizer(text, add_special_tokens=isinstance(ctx, str))["input_ids"]
        if not ids:
            raise UserError("the prompt is empty")
        self._check_length(len(ids))
        return list(ids)

    def encode_continuation(self, prompt_text: str, body: list[int], continuation: str) -> list[int]:
        """Token ids of a continuation as the tokenizer splits it after the prompt.

        The prompt and continuation are tokenized together; when that keeps the prompt's tokens intact, the
        continuation's tokens are the rest. When a token would straddle the boundary, the continuation is
        tokenized on its own (the prompt's tokens stay as the model saw them). `body` is the prompt's
        tokens without special tokens added by the tokenizer."""
        if not continuation:
            raise UserError("a continuation must not be empty")
        joint = self.tokenizer(prompt_text + continuation, add_special_tokens=False)["input_ids"]
        if joint[: len(body)] == body and len(joint) > len(body):
            return list(joint[len(body) :])
        return list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def encode_requests(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> tuple[list[list[int]], list[tuple[int, int, int, str, list[int]]]]:
        """The token ids of scoring requests: the distinct prompts, and for every continuation an item
        (request index, continuation index, prompt index, continuation text, continuation ids)."""
        prompt_of: dict[str, int] = {}
        prompts: list[list[int]] = []
        bodies: list[list[int]] = []
        items: list[tuple[int, int, int, str, list[int]]] = []
        for r, (context, continuations) in enumerate(requests):
            text = self.render(context)
            if text not in prompt_of:
                prompt_of[text] = len(prompts)
                prompts.append(self.encode_prompt(context))
                bodies.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            p = prompt_of[text]
            for j, cont in enumerate(continuations):
                cont_ids = self.encode_continuation(text, bodies[p], cont)
                self._check_length(len(prompts[p]) + len(cont_ids))
                items.append((r, j, p, cont, cont_ids))
        return prompts, items

    def tokens(self, text: str) -> tuple[int, ...]:
        """Token ids of a text on its own (no special tokens added)."""
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def sequence(self, context: Context, body: Sequence[int] = ()) -> Seq:
        """A context's rendered prompt followed by body tokens (a stored sequence to cut)."""
        prompt = self.encode_prompt(context)
        return Seq(self.render(context), tuple(prompt) + tuple(body), len(prompt))

    def candidate(self, name: str, spellings: Sequence[str]) -> Candidate:
        """A candidate answer with its spellings tokenized on their own, duplicates removed."""
        seen: list[tuple[int, ...]] = []
        for s in spellings:
            ids = self.tokens(s)
            if ids and ids not in seen:
                seen.append(ids)
        return Candidate(name, tuple(seen))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (a leading space shown as a space, not as the tokenizer's marker)."""
        return [self._token_text(t) for t in self.tokenizer.convert_ids_to_tokens(list(ids))]

    def _token_text(self, token: str) -> str:
        return self.tokenizer.convert_tokens_to_string([token])

    def _check_length(self, n: int) -> None:
        if self.max_length is not None and n > self.max_length:
            raise UserError(
                f"prompt of {n} tokens is longer than the model's context window ({self.max_length})"
            )
