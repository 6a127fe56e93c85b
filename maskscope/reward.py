"""Reward: the implicit reward of a fine-tuned child over its parent, and reward models a user has.

- `implicit_reward(parent, child, items)`: for each (conversation, response), log C(y|x) - log P(y|x) over the
  response's tokens, summed and per token; exact (teacher-forced scores of both models through the engine).
  It is the reward a DPO-style fine-tuning implicitly optimises (up to its temperature), and for any child it
  says which responses the fine-tuning made more likely than the parent found them.
- `RewardModel` (`load_reward_model("hf:DIR")`, or the model name `reward:hf:DIR` in the registry): a local
  transformers sequence-classification model with one label, scored through its own chat template. The score
  is read at the last token of the rendered conversation after trailing end-of-sequence, padding and
  whitespace tokens are removed and one end-of-sequence token is appended (`append_eos`), so a pair scores
  the same with or without a trailing EOS; rows are padded with explicit attention masks and position ids, so
  it scores the same padded on the left or on the right, alone or in any batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskscope.errors import UserError
from maskscope.models.base import Context, Conversation

REWARD_PREFIX = "reward:"


@dataclass(frozen=True)
class ImplicitReward:
    """The implicit reward of one response: per token log C(y_t | x, y_<t) - log P(y_t | x, y_<t)."""

    response: str
    tokens: list[str]
    child_logprobs: list[float]
    parent_logprobs: list[float]

    @property
    def per_token(self) -> list[float]:
        """The child's minus the parent's log-probability of each response token."""
        return [c - p for c, p in zip(self.child_logprobs, self.parent_logprobs, strict=True)]

    @property
    def total(self) -> float:
        """log C(y|x) - log P(y|x): the sum over the response's tokens."""
        return float(sum(self.child_logprobs) - sum(self.parent_logprobs))

    @property
    def mean(self) -> float:
        """The per-token mean of the difference (the sum divided by the number of tokens)."""
        return self.total / len(self.tokens)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the sum and the per-token mean."""
        return {
            "response": self.response,
            "n_tokens": len(self.tokens),
            "total": self.total,
            "mean": self.mean,
            "child_logprob": float(sum(self.child_logprobs)),
            "parent_logprob": float(sum(self.parent_logprobs)),
        }


def implicit_reward(parent: Any, child: Any, items: Sequence[tuple[Context, str]]) -> list[ImplicitReward]:
    """The implicit reward of the child over the parent for each (conversation, response) item, in order:
    exact teacher-forced log-probabilities of the response under both models. The two must render the
    prompt and split the response into tokens the same way (one tokenizer and chat template)."""
    requests = [(context, [response]) for context, response in items]
    for context, _ in items:
        if parent.render(context) != child.render(context):
            raise UserError(
                f"{parent.name} and {child.name} render the same conversation differently (another chat "
                "template): an implicit reward needs one template and one tokenizer"
            )
    scored: list[list[Any]] = [[None, None] for _ in items]
    for m, model in enumerate((parent, child)):
        for r, _, s in model.score_many(requests):
            scored[r][m] = s
    out = []
    for (_, response), (p, c) in zip(items, scored, strict=True):
        if list(p.token_ids) != list(c.token_ids):
            raise UserError(
                f"{parent.name} and {child.name} split the response {response[:40]!r} into different "
                "tokens: an implicit reward needs one tokenizer"
            )
        out.append(ImplicitReward(response, list(c.tokens), list(c.logprobs), list(p.logprobs)))
    return out


# ---------------------------------------------------------------------------------------------- reward models
def _directory(name: str) -> Path:
    """The directory of a reward model name: "hf:DIR" (or "reward:hf:DIR")."""
    name = name.removeprefix(REWARD_PREFIX)
    scheme, sep, rest = name.partition(":")
    if not sep or scheme != "hf" or not rest:
        raise UserError(
            f"a reward model is a local sequence-classification model, hf:DIR, not {name[:200]!r}"
        )
    return Path(rest).expanduser()


def check_reward_dir(name: str) -> Path:
    """Refuse (one line), reading only config.json, a name that is not a local sequence-classification model
    with a single output (a reward model); return its directory."""
    from maskscope.models.loading import check_hf_dir

    directory = _directory(name)
    check_hf_dir(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {directory / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{directory / 'config.json'} is not a JSON object")
    architectures = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{directory} is not a sequence-classification (reward) model: its architectures are "
            f"{architectures or 'not given'}"
        )
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
    if labels != 1:
        raise UserError(f"{directory} has {labels} output labels; a reward model has one (a scalar score)")
    return directory


class RewardModel:
    """A sequence-classification reward model behind the `rewards` request type (see the module docstring)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(
        self, model: Any, tokenizer: Any, *, name: str, weights_digest: str, append_eos: bool = True
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.weights_digest = weights_digest
        self.append_eos = append_eos
        self.max_batch = 16
        eos = tokenizer.eos_token_id
        self.eos_id: int | None = eos if isinstance(eos, int) else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.trailing = {i for i in (self.eos_id, tokenizer.pad_token_id) if i is not None}
        # Decoder reward models (Llama, Qwen, GPT-2, ...) apply a `score` head at every position and pool the
        # last non-padding one; that pooling finds "padding" by token id, which fails when the pad token is
        # the end-of-sequence token. The head is applied here to the hidden state of the row's own last token.
        self.decoder = hasattr(model, "score") and hasattr(model, getattr(model, "base_model_prefix", ""))

    def fingerprint(self) -> dict[str, Any]:
        """Weights hash, chat template and the end-of-sequence convention."""
        import hashlib

        template = getattr(self.tokenizer, "chat_template", None) or ""
        return {
            "backend": "hf-reward",
            "weights": self.weights_digest,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16],
            "append_eos": self.append_eos,
        }

    def render_pair(self, context: Context, response: str) -> str:
        """The text the reward model reads: the conversation with the response as the assistant's turn (after
        the conversation's prefill, if any), through its own chat template."""
        ctx = Conversation.coerce(context)
        if isinstance(ctx, str):
            return ctx + response
        messages = [{"role": m.role, "content": m.content} for m in ctx.messages]
        messages.append({"role": "assistant", "content": ctx.prefill + response})
        if getattr(self.tokenizer, "chat_template", None) is None:
            return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False))

    def encode_pair(self, context: Context, response: str) -> list[int]:
        """Token ids of the rendered pair (see `normalize`)."""
        text = self.render_pair(context, response)
        templated = getattr(self.tokenizer, "chat_template", None) is not None
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        return self.normalize(ids)

    def normalize(self, ids: Sequence[int]) -> list[int]:
        """The ids without trailing end-of-sequence, padding or whitespace-only tokens, then one
        end-of-sequence token if `append_eos`: the same pair gives the same ids with or without a final EOS."""
        ids = list(ids)
        while ids and (ids[-1] in self.trailing or not self.tokenizer.decode([ids[-1]]).strip()):
            ids.pop()
        if not ids:
            raise UserError("a reward model's input is empty")
        if self.append_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and len(ids) > limit:
            raise UserError(f"a pair of {len(ids)} tokens is longer than the reward model's window ({limit})")
        return ids

    def score_ids(self, rows: Sequence[Sequence[int]], padding_side: str = "right") -> list[float]:
        """The reward of each row of token ids (normalised first), in batches padded on the given side."""
        import torch

        rows = [self.normalize(r) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = [0.0] * len(rows)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            last = []
            for b, i in enumerate(chunk):
                n = len(rows[i])
                at = slice(width - n, width) if padding_side == "left" else slice(0, n)
                ids[b, at] = torch.tensor(rows[i])
                mask[b, at] = 1
                last.append(width - 1 if padding_side == "left" else n - 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                if self.decoder:
                    base = getattr(self.model, self.model.base_model_prefix)
                    hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions)[0]
                    picked = hidden[torch.arange(len(chunk)), torch.tensor(last)]
                    scores = self.model.score(picked).float()[:, 0]
                else:  # encoder classifiers pool their first token themselves; padded on the right
                    scores = self.model(input_ids=ids, attention_mask=mask).logits.float()[:, 0]
            for b, i in enumerate(chunk):
                out[i] = float(scores[b])
        return out

    def rewards(self, items: Sequence[tuple[Context, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (item index, {"reward", "n_tokens"}) for each (conversation, response) item."""
        rows = [self.encode_pair(c, r) for c, r in items]
        side = "right" if not self.decoder else getattr(self.tokenizer, "padding_side", "right")
        for k, score in enumerate(self.score_ids(rows, side)):
            yield k, {"reward": score, "n_tokens": len(rows[k])}


def load_reward_model(name: str, *, append_eos: bool = True) -> RewardModel:
    """Load a local sequence-classification reward model, "hf:DIR" (local files only, fp32)."""
    import torch
    import transformers

    from maskscope.models.loading import first_line, load_errors, quiet_transformers, weights_digest

    directory = check_reward_dir(name)
    quiet_transformers(transformers)
    digest = weights_digest(directory)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        classifier = transformers.AutoModelForSequenceClassification
        model = classifier.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    except load_errors() as e:
        raise UserError(f"cannot load reward model from {directory}: {first_line(e)}") from e
    return RewardModel(model, tokenizer, name=directory.name, weights_digest=digest, append_eos=append_eos)
