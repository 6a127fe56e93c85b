"""The language-model protocol every backend implements, the context types, and the result types."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from maskscope.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a chat: a role (system, user or assistant) and its text."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"message role must be one of {', '.join(ROLES)}, not {self.role!r}")


@dataclass(frozen=True)
class Conversation:
    """A chat context: messages, and optionally text the assistant's reply is forced to begin with (prefill).

    A context that ends inside the assistant's turn is written as `prefill`: the reply is rendered with the
    model's chat template up to the assistant header, then the prefill text follows verbatim.
    """

    messages: tuple[Message, ...]
    prefill: str = ""

    @classmethod
    def of(
        cls,
        *,
        system: str | None = None,
        user: str | None = None,
        preamble: str | None = None,
        prefill: str = "",
    ) -> Conversation:
        """Build a one-turn conversation. `preamble` is prepended to the user turn, for models without a
        system role; `prefill` starts the assistant's reply."""
        messages: list[Message] = []
        if system is not None:
            messages.append(Message("system", system))
        text = user or ""
        if preamble:
            text = f"{preamble}\n\n{text}" if text else preamble
        if user is not None or preamble:
            messages.append(Message("user", text))
        return cls(tuple(messages), prefill)

    @classmethod
    def coerce(cls, context: Context) -> Conversation | str:
        """Accept a Conversation, a list of {"role", "content"} dicts, or a raw prompt string (no template)."""
        if isinstance(context, Conversation | str):
            return context
        if isinstance(context, Sequence):
            messages = []
            for i, m in enumerate(context):
                if isinstance(m, Message):
                    messages.append(m)
                elif isinstance(m, Mapping) and "role" in m and "content" in m:
                    messages.append(Message(str(m["role"]), str(m["content"])))
                else:
                    raise UserError(f"message {i} must be a mapping with 'role' and 'content'")
            prefill = ""
            if messages and messages[-1].role == "assistant":
                prefill = messages.pop().content
            return cls(tuple(messages), prefill)
        raise UserError(
            f"a context must be a Conversation, a list of messages or a string, not {type(context)}"
        )

    def with_prefill(self, prefill: str) -> Conversation:
        """The same conversation with the assistant's reply forced to begin with `prefill`."""
        return Conversation(self.messages, prefill)

    def to_messages(self) -> list[dict[str, str]]:
        """The messages as plain dicts (the assistant prefill, if any, as a final assistant message)."""
        out = [{"role": m.role, "content": m.content} for m in self.messages]
        if self.prefill:
            out.append({"role": "assistant", "content": self.prefill})
        return out


Context = Conversation | str | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Scored:
    """Exact teacher-forced log-probability of a continuation given a context (natural log)."""

    continuation: str
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float]

    @property
    def total(self) -> float:
        """Summed log-probability of the continuation's tokens."""
        return float(sum(self.logprobs))

    @property
    def prob(self) -> float:
        """Probability of the continuation (exp of `total`)."""
        return math.exp(self.total)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Scored:
        """Inverse of `to_json`."""
        return cls(d["continuation"], list(d["token_ids"]), list(d["tokens"]), list(d["logprobs"]))


@dataclass(frozen=True)
class TokenDist:
    """The top-k of a next-token distribution (natural-log probabilities, most probable first)."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float]
    complete: bool = True  # False when a server returned fewer than the top-k asked for (its limit)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenDist:
        """Inverse of `to_json`."""
        return cls(
            list(d["token_ids"]), list(d["tokens"]), list(d["logprobs"]), bool(d.get("complete", True))
        )

    def as_pairs(self) -> list[tuple[str, float]]:
        """(token, probability) pairs."""
        return [(t, math.exp(lp)) for t, lp in zip(self.tokens, self.logprobs, strict=True)]


@dataclass(frozen=True)
class SampleParams:
    """How to sample: the same parameters always give the same samples for the same sample index."""

    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (part of every sample's cache key)."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a run seeded with `seed`: a hash, so samples never share a stream and
    sample i is the same whichever batch or request draws it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Sample:
    """One sampled reply. `finish_reason` is "eos", "stop" (a stop string) or "length"."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Sample:
        """Inverse of `to_json`."""
        return cls(int(d["index"]), d["text"], list(d["token_ids"]), d["finish_reason"])


@runtime_checkable
class LanguageModel(Protocol):
    """What every backend offers. `capabilities` names the primitives it supports."""

    name: str
    capabilities: frozenset[str]

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the model that changes its answers (weights hash, dtype, adapter, steering)."""
        ...

    def render(self, context: Context) -> str:
        """The exact prompt text the model sees for a context (chat template applied, prefill appended)."""
        ...

    def score_many(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> Iterator[tuple[int, int, Scored]]:
        """Score every continuation of every request; yield (request index, continuation index, result) as
        each result exists, in any order."""
        ...

    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """Yield (context index, top-k next-token distribution) as each exists, in any order."""
        ...

    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams
    ) -> Iterator[Sample]:
        """Yield the samples with these indices; sample i depends only on (context, params, i)."""
        ...


def require(model: LanguageModel, capability: str, what: str) -> None:
    """Refuse up front, in one line, when a model lacks a capability an experiment needs."""
    if capability not in model.capabilities:
        why = getattr(model, "missing_capabilities", dict)().get(capability)
        reason = f" ({why})" if why else ""
        raise UserError(f"{what} needs '{capability}', which model {model.name} does not offer{reason}")


class ModelAPI:
    """The convenience calls of the public API, written once on top of a backend's batch primitives."""

    def score(self: Any, context: Context, continuations: Sequence[str] | str) -> list[Scored]:
        """Exact log-probabilities of the reply beginning with each continuation (one shared context pass)."""
        if isinstance(continuations, str):
            continuations = [continuations]
        out: list[Scored | None] = [None] * len(continuations)
        for _, j, scored in self.score_many([(context, list(continuations))]):
            out[j] = scored
        return [s for s in out if s is not None]

    def next_token_distribution(self: Any, context: Context, top_k: int = 10) -> TokenDist:
        """The top-k of the distribution of the reply's first token."""
        return next(iter(self.next_token_distributions([context], top_k)))[1]

    def sample(
        self: Any,
        context: Context,
        n: int = 1,
        max_new_tokens: int = 40,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
    ) -> list[Sample]:
        """n sampled replies, batched; sample i is reproducible from (context, parameters, seed, i)."""
        params = SampleParams(max_new_tokens, temperature, top_p, seed, tuple(stop))
        return sorted(self.sample_indices(context, range(n), params), key=lambda s: s.index)
