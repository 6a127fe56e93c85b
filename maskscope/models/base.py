"""The language-model protocol every backend implements, the context types, and the result types."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
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


def stream_key(*parts: object) -> str:
    """The random-stream key of a context: a hash of what the model is conditioned on (the rendered prompt,
    and for a cut of a stored sequence its body tokens). Samples of different contexts never share a stream."""
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:32]


def sample_seed(seed: int, stream: str, index: int) -> int:
    """The seed of sample `index` of a context with stream key `stream`, in a run seeded with `seed`: a hash,
    so sample i depends on (seed, context, i) and on nothing else (not on the batch or request that draws
    it), and two contexts never share a stream."""
    text = f"{seed}:{stream}:{index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


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


@dataclass(frozen=True)
class Seq:
    """A rendered prompt's tokens followed by body tokens (e.g. a chain of thought); `prompt_len` tokens
    belong to the prompt."""

    prompt_text: str
    ids: tuple[int, ...]
    prompt_len: int

    def body(self, cut: int) -> list[int]:
        """The body tokens before an absolute cut."""
        return list(self.ids[self.prompt_len : cut])


@dataclass(frozen=True)
class Candidate:
    """A candidate answer and the token-id spellings that count as it (e.g. " True" and " true")."""

    name: str
    spellings: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ForcedJob:
    """The answer after `seq[:cut] + answer_prefix`: the exact probability of each candidate (as a whole
    word), and, when `open_tokens` > 0, the greedy continuation of up to that many tokens."""

    seq: Seq
    cut: int
    answer_prefix: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    open_tokens: int = 0
    open_until: str = "number"

    def args(self) -> dict[str, Any]:
        """The job's arguments, as they enter its cache key (with the rendered prompt)."""
        return {
            "body": self.seq.body(self.cut),
            "answer_prefix": list(self.answer_prefix),
            "candidates": [[c.name, [list(s) for s in c.spellings]] for c in self.candidates],
            "open_tokens": self.open_tokens,
            "open_until": self.open_until,
            "definition": "whole-word",
        }


@dataclass(frozen=True)
class ContinueJob:
    """A free continuation of `seq[:cut]`: up to `max_new_tokens`, greedy at temperature 0, else sampled with
    the generator of (seed, this cut's stream, index)."""

    seq: Seq
    cut: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    stop: tuple[str, ...] = ()

    def args(self) -> dict[str, Any]:
        """The job's arguments, as they enter its cache key (with the rendered prompt)."""
        params = SampleParams(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop)
        return {"body": self.seq.body(self.cut), **params.to_json(), "index": self.index}

    def stream(self) -> str:
        """The random-stream key: the rendered prompt and the body up to the cut."""
        return stream_key(self.seq.prompt_text, self.seq.body(self.cut))


class Capability(StrEnum):
    """What a backend can do; each capability is a protocol below. Compares equal to its string."""

    SCORE = "score"
    NEXT_TOKEN = "next_token_distribution"
    SAMPLE = "sample"
    TOKEN_LOGPROBS = "token_logprobs"
    SUPPORT_LOGPROBS = "support_logprobs"
    POSITION_LOGPROBS = "position_logprobs"  # the full next-token distribution at each position of tokens
    TOKEN_RANKS = "token_ranks"
    CUTS = "cuts"  # forced answers and continuations from cuts of a stored sequence (KV reuse)
    ACTIVATIONS = "activations"
    STEERING = "steering"
    ADAPTERS = "adapters"


@runtime_checkable
class LanguageModel(Protocol):
    """What every model has: a name, its capabilities, an identity for cache keys, and prompt rendering."""

    name: str
    capabilities: frozenset[str]

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the model that changes its answers (weights hash, dtype, adapter, steering)."""
        ...

    def render(self, context: Context) -> str:
        """The exact prompt text the model sees for a context (chat template applied, prefill appended)."""
        ...


@runtime_checkable
class Tokenizing(Protocol):
    """The text side of a model whose tokenizer is here: token ids of prompts and texts, and back."""

    tokenizer: Any

    def encode_prompt(self, context: Context) -> list[int]:
        """Token ids of the rendered prompt."""
        ...

    def tokens(self, text: str) -> tuple[int, ...]:
        """Token ids of a text on its own (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        ...

    def sequence(self, context: Context, body: Sequence[int] = ()) -> Seq:
        """A context's rendered prompt followed by body tokens."""
        ...

    def candidate(self, name: str, spellings: Sequence[str]) -> Candidate:
        """A candidate answer and its spellings as token ids."""
        ...


@runtime_checkable
class Scoring(Protocol):
    """Exact teacher-forced log-probabilities of text continuations."""

    def score_many(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> Iterator[tuple[int, int, Scored]]:
        """Score every continuation of every request; yield (request index, continuation index, result) as
        each result exists, in any order."""
        ...


@runtime_checkable
class NextToken(Protocol):
    """The (top of the) next-token distribution after a context."""

    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """Yield (context index, top-k next-token distribution) as each exists, in any order."""
        ...


@runtime_checkable
class Sampling(Protocol):
    """Seeded samples: sample i depends only on (context, params, i)."""

    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams
    ) -> Iterator[Sample]:
        """Yield the samples with these indices."""
        ...


@runtime_checkable
class TokenLogprobs(Protocol):
    """Exact log-probabilities of given token ids after a context."""

    def token_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, list[float]]]:
        """Yield (item index, the log-probability of each token) as each exists."""
        ...


@runtime_checkable
class SupportLogprobs(Protocol):
    """Next-token log-probabilities on a support, plus the remainder, at each position of given tokens."""

    def support_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int], int | Sequence[Sequence[int]]]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (item index, {"support", "logprobs"}) as each exists."""
        ...


@runtime_checkable
class PositionLogprobs(Protocol):
    """The full next-token log-probability vector at each position of given tokens, from one teacher-forced
    pass."""

    def position_logprobs(self, items: Sequence[tuple[Context, Sequence[int]]]) -> Iterator[tuple[int, Any]]:
        """Yield (item index, log-probabilities [T, V] before each of the T given tokens) as each exists."""
        ...


@runtime_checkable
class TokenRanks(Protocol):
    """The log-probability and the rank of each given token after a context (rank 1: the most probable token;
    tied tokens share the best rank, i.e. rank = 1 + the number of tokens strictly more probable)."""

    def token_ranks(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Yield (item index, {"logprobs": [...], "ranks": [...]}) as each exists."""
        ...


@runtime_checkable
class Cuts(Protocol):
    """Forced answers and free continuations from cuts of a stored sequence (the KV cache reused)."""

    def forced_answers(
        self, jobs: Sequence[ForcedJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (job index, result) as each exists."""
        ...

    def continuations(
        self, jobs: Sequence[ContinueJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (job index, result) as each exists."""
        ...


@runtime_checkable
class Activations(Protocol):
    """The residual stream at chosen layers (0 = embedding output) and positions ("last", "reply_mean",
    "all")."""

    num_layers: int

    def activations(self, items: Sequence[Any], layers: Sequence[int], positions: str = "last") -> list[Any]:
        """Activations of each item (a context, or a context and reply token ids)."""
        ...


@runtime_checkable
class Steering(Protocol):
    """Additive interventions on the residual stream, in a context manager (the model never mutated)."""

    def steer(self, vector: Any, layers: Sequence[int], alpha: float = 1.0, positions: str = "reply") -> Any:
        """A context manager under which every call is steered."""
        ...


@runtime_checkable
class Adapters(Protocol):
    """Fine-tuned adapters on a parent model: a child (NAME+lora:DIR) loads as a model of its own, the adapter
    merged into the parent's weights; `adapter` is its hash (None for a parent)."""

    adapter: str | None


PROTOCOLS: dict[Capability, type] = {
    Capability.SCORE: Scoring,
    Capability.NEXT_TOKEN: NextToken,
    Capability.SAMPLE: Sampling,
    Capability.TOKEN_LOGPROBS: TokenLogprobs,
    Capability.SUPPORT_LOGPROBS: SupportLogprobs,
    Capability.POSITION_LOGPROBS: PositionLogprobs,
    Capability.TOKEN_RANKS: TokenRanks,
    Capability.CUTS: Cuts,
    Capability.ACTIVATIONS: Activations,
    Capability.STEERING: Steering,
    Capability.ADAPTERS: Adapters,
}


def require(model: LanguageModel, capability: Capability | str, what: str) -> None:
    """Refuse up front, in one line, when a model lacks a capability an experiment needs (it does not
    advertise it, or does not implement its protocol)."""
    cap = Capability(capability)
    if cap not in model.capabilities or not isinstance(model, PROTOCOLS[cap]):
        missing = getattr(model, "missing_capabilities", None)
        why = missing().get(cap.value) if callable(missing) else None
        reason = f" ({why})" if why else ""
        raise UserError(f"{what} needs '{cap.value}', which model {model.name} does not offer{reason}")


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

    def forced(
        self: Any, jobs: Sequence[ForcedJob], advance: Callable[[int], None] | None = None, max_rows: int = 32
    ) -> list[dict[str, Any]]:
        """Every forced-answer job's result, in order; `advance(n)` is told as results arrive."""
        return _in_order(self.forced_answers(jobs, max_rows=max_rows), len(jobs), advance)

    def continued(
        self: Any,
        jobs: Sequence[ContinueJob],
        advance: Callable[[int], None] | None = None,
        max_rows: int = 32,
    ) -> list[dict[str, Any]]:
        """Every continuation job's result, in order; `advance(n)` is told as results arrive."""
        return _in_order(self.continuations(jobs, max_rows=max_rows), len(jobs), advance)


def _in_order(results: Iterator[tuple[int, Any]], n: int, advance: Callable[[int], None] | None) -> list[Any]:
    out: list[Any] = [None] * n
    for k, result in results:
        out[k] = result
        if advance:
            advance(1)
    return out
