"""The transformers engine: every forward pass, KV cache, batch plan and decoding loop of a local model.

One forward/cache wrapper (`_forward`), one LM-head path checked against the model's own logits at load
(`_head`), one pad-and-encode routine (`encode`), one batch planner (`plan_batches`) and one decoding loop
(`_decode`). On top of them:

- scoring: each distinct prompt is encoded once and its continuations (one or many tokens) reuse its cache;
- sampling: a prompt is encoded once; samples are rows of one decoding loop, each with its own generator;
- cuts of a stored sequence: a prompt + body (say a chain of thought) is encoded once, keeping its cache and
  hidden states; a row asks for the sequence cut at some token, optionally followed by a suffix (e.g. "The
  answer is"), then teacher-forced branches (candidate answers) and/or decoding. A row's numbers equal those
  of encoding `seq[:cut] + suffix` from scratch, at the cost of the suffix alone. Forced answers and free
  continuations (`forced_answers`, `continuations`) are request types built on it.

Random streams: sample `index` of a context draws from a generator seeded by (seed, the context's stream key,
index) and by nothing else, so it is the same whichever batch draws it and never shared with another context.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from maskscope.errors import UserError
from maskscope.models.base import (
    Capability,
    Context,
    ContinueJob,
    ForcedJob,
    ModelAPI,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
    sample_seed,
    stream_key,
)
from maskscope.models.chat import ChatTokenizer
from maskscope.models.hooks import (
    POSITIONS,
    Steering,
    as_vectors,
    capture,
    check_layers,
    decoder_layers,
    steering_hooks,
)

PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: for GPUs without bfloat16
HEAD_POSITIONS = 512  # positions per LM-head call when scoring: bounds the [positions x vocabulary] tensor
MIN_SHARED = 8  # a common prefix of at least this many tokens is encoded once for a batch


# ---------------------------------------------------------------------------------------------- planning
def plan_batches(
    order: Sequence[int],
    cost: Sequence[int],
    budget: int,
    max_rows: int,
    rows: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """The one batch planner: split `order` into consecutive batches whose padded size (items x longest
    cost) stays within `budget` tokens and whose rows (`rows[i]` per item, default 1) stay within `max_rows`.
    An item over either limit forms a batch of its own. Callers sort `order` (longest first, or by shared
    prefix) and map results back by index."""
    batch: list[int] = []
    longest = used = 0
    for i in order:
        weight = 1 if rows is None else rows[i]
        new_longest = max(longest, cost[i])
        if batch and (new_longest * (len(batch) + 1) > budget or used + weight > max_rows):
            yield batch
            batch, new_longest, used = [], cost[i], 0
        batch.append(i)
        longest = new_longest
        used += weight
    if batch:
        yield batch


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new KV cache holding the given batch rows of `cache` (repeats allowed); `cache` is left untouched."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.batch_select_indices(rows)
    return new


# ---------------------------------------------------------------------------------------------- row types
@dataclass(frozen=True)
class Row:
    """One row of a batch: sequence `seq` (an index into the encoded batch) cut at `cut` tokens, then
    `suffix` run after it. Each of `branches` is teacher-forced after the suffix (e.g. candidate answers);
    `decode` > 0 generates up to that many tokens after the suffix: greedy at temperature 0, else drawn from
    the generator of (seed, stream, index)."""

    seq: int
    cut: int
    suffix: tuple[int, ...] = ()
    branches: tuple[tuple[int, ...], ...] = ()
    decode: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    stream: str = ""
    stop: tuple[str, ...] = ()
    until: Callable[[str], bool] | None = field(default=None, compare=False)


@dataclass
class RowResult:
    """What a row produced.

    `logprobs`: next-token log-probabilities before each suffix token and after the last
    ([len(suffix) + 1, V], if asked); `next_logprobs`: the last of these [V]. `branch_logprobs[b]`: the same
    along branch b, starting after the suffix ([len(branch) + 1, V]). Then the generated token ids, text and
    finish reason ("eos", "stop", "until", "length", or "none" when nothing was generated)."""

    logprobs: torch.Tensor | None
    next_logprobs: torch.Tensor
    branch_logprobs: list[torch.Tensor]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class Prefix:
    """A prefix encoded once (one row): its token ids, hidden states [L, H] and KV cache."""

    ids: tuple[int, ...]
    hidden: torch.Tensor
    cache: Any


@dataclass
class Encoded:
    """A batch of right-padded sequences encoded once: the KV cache [S rows, width W], the attention mask
    [S, W], the hidden states of the prefix all sequences share [L, H] (encoded once) and of the rest
    [S, W - L, H], the sequences' lengths and where each one's reply starts (for steering)."""

    cache: Any
    mask: torch.Tensor
    prefix_hidden: torch.Tensor | None
    body_hidden: torch.Tensor
    lengths: list[int]
    starts: list[int]  # per sequence, the first position a "reply" steering applies to

    @property
    def prefix_len(self) -> int:
        """Tokens shared by every sequence and encoded once."""
        return 0 if self.prefix_hidden is None else int(self.prefix_hidden.shape[0])

    def hidden_at(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Hidden states of the given sequences at the given positions [N, H]."""
        shared = self.prefix_len
        body = self.body_hidden[seq, (pos - shared).clamp(min=0)]
        if self.prefix_hidden is None:
            return body
        pre = self.prefix_hidden[pos.clamp(max=shared - 1)]
        return torch.where((pos < shared)[:, None], pre, body)

    def last_hidden(self) -> torch.Tensor:
        """The hidden state at each sequence's last token [S, H]."""
        dev = self.body_hidden.device
        seq = torch.arange(len(self.lengths), device=dev)
        return self.hidden_at(seq, torch.tensor(self.lengths, device=dev) - 1)


# ---------------------------------------------------------------------------------------------- the engine
class HFModel(ChatTokenizer, ModelAPI):
    """A transformers causal LM and its tokenizer behind the model protocols.

    `precision="bf16"` holds the weights (and so the KV cache) in bfloat16, which CPUs with AMX multiply
    faster; log-probabilities are always computed in float32 from the logits. fp32 is the default, for
    exactness. (Autocast would cast every fp32 weight to bf16 on every call, which costs about what it saves.)
    The module is converted in place: give a copy if the fp32 model is needed alongside.

    The LM head is applied to selected hidden states only (the full [positions x vocabulary] logits of a
    batch would not fit in memory). At construction a probe checks that this path equals the model's own
    `model(x).logits` (after the final soft-cap some architectures declare); a model whose head does other
    post-processing is refused in one line rather than scored wrong.
    """

    capabilities = frozenset(
        {
            Capability.SCORE,
            Capability.NEXT_TOKEN,
            Capability.SAMPLE,
            Capability.TOKEN_LOGPROBS,
            Capability.SUPPORT_LOGPROBS,
            Capability.POSITION_LOGPROBS,
            Capability.TOKEN_RANKS,
            Capability.CUTS,
            Capability.ACTIVATIONS,
            Capability.STEERING,
            Capability.ADAPTERS,  # NAME+lora:DIR loads a child, merged, its hash in the fingerprint
        }
    )

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        weights_digest: str,
        precision: str = "fp32",
        token_budget: int = 8192,
        max_batch: int = 64,
        adapter: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # (a model loaded in that dtype already is not moved: accelerate refuses .to on offloaded layers)
        self.model = (model.to(half) if half is not None and model.dtype != half else model).eval()
        ChatTokenizer.__init__(
            self, tokenizer, int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        )
        self.name = name
        self.weights_digest = weights_digest
        self.adapter = adapter  # the hash of a LoRA adapter merged into the weights, if any
        self.precision = precision
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._word_mask: torch.Tensor | None = None
        self._steering: Steering | None = None
        self.check_head()

    # ----------------------------------------------------------------- identity
    def fingerprint(self) -> dict[str, Any]:
        """Weights hash, dtype and precision, chat template, adapter; steering adds its own part."""
        return {
            "backend": "hf",
            "weights": self.weights_digest,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "precision": self.precision,
            "chat_template": self.template_digest(),
            "adapter": self.adapter,
            "steering": None if self._steering is None else self._steering.digest(),
        }

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def end_tokens(self) -> list[str]:
        """The text of each end-of-sequence token that tokenizes back to itself (e.g. "<|im_end|>")."""
        out = []
        for i in sorted(self.eos_ids):
            text = self.tokenizer.convert_ids_to_tokens(i)
            if isinstance(text, str) and self.tokens(text) == (i,):
                out.append(text)
        return out

    # ----------------------------------------------------------------- forward passes
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
        starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Run the decoder (without the LM head, to keep memory small); return last hidden states and cache.
        `positions` are absolute token positions [B, T]; `starts` [B] is where each row's reply begins (the
        positions a "reply" steering applies to)."""
        if self._steering is not None:
            rows = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
            self._steering.where = (positions.expand(ids.shape[0], -1), rows if starts is None else starts)
        with torch.inference_mode():
            out = self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            )
        return out.last_hidden_state, out.cache

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the vocabulary of the LM head applied to selected hidden states."""
        with torch.inference_mode():
            logits = self.model.get_output_embeddings()(hidden).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return torch.log_softmax(logits, dim=-1)

    def check_head(self, probe: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), tolerance: float = 1e-3) -> None:
        """Refuse, in one line, a model whose own logits differ from this engine's head path on a probe."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        ids = torch.tensor([[t % vocab for t in probe]], device=self.device)
        with torch.inference_mode():
            own = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
        hidden, _ = self._forward(
            ids, torch.ones_like(ids), torch.arange(ids.shape[1], device=self.device)[None]
        )
        mine = self._head(hidden[0])
        gap = float((own - mine).abs().max())
        if not gap <= tolerance * (10 if self.precision != "fp32" else 1):
            raise UserError(
                f"model {self.name}: its LM head post-processes logits in a way maskscope does not apply "
                f"(log-probabilities differ by {gap:.3g} on a probe); it cannot be scored exactly"
            )

    def encode(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        prefix: Prefix | None = None,
        min_shared: int = MIN_SHARED,
        starts: Sequence[int] | None = None,
    ) -> Encoded:
        """The one pad-and-encode routine: right-padded sequences encoded in one batch, keeping the cache and
        every position's hidden state. A prefix they all share is encoded once: `prefix` if given (it must be
        shorter than every sequence), else their longest common prefix if at least `min_shared` tokens.
        `starts`: where each sequence's reply begins, for steering (default: its last token, so that what
        follows the sequence is predicted under steering)."""
        if not seqs or any(not s for s in seqs):
            raise UserError("every sequence must have at least one token")
        for s in seqs:
            self._check_length(len(s))
        starts = [len(s) - 1 for s in seqs] if starts is None else list(starts)
        dev = self.device
        if prefix is None and len(seqs) > 1:
            shared = min(common_prefix(seqs), min(len(s) for s in seqs) - 1, self._unsteered_up_to(starts))
            if shared >= min_shared:
                prefix = self.encode_prefix(seqs[0][:shared])
        if prefix is not None and any(
            len(s) <= len(prefix.ids) or tuple(s[: len(prefix.ids)]) != prefix.ids for s in seqs
        ):
            raise ValueError("the shared prefix must be a proper prefix of every sequence")
        shared = 0 if prefix is None else len(prefix.ids)
        cache = None
        if prefix is not None:
            cache = _select_rows(prefix.cache, torch.zeros(len(seqs), dtype=torch.long, device=dev))
        width = max(len(s) for s in seqs) - shared
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(seqs), shared + width), dtype=torch.long, device=dev)
        for r, s in enumerate(seqs):
            ids[r, : len(s) - shared] = torch.tensor(list(s[shared:]), device=dev)
            mask[r, : len(s)] = 1
        positions = shared + torch.arange(width, device=dev).expand(len(seqs), -1)
        hidden, cache = self._forward(ids, mask, positions, cache, torch.tensor(starts, device=dev))
        lengths = [len(s) for s in seqs]
        return Encoded(cache, mask, None if prefix is None else prefix.hidden, hidden, lengths, starts)

    def _unsteered_up_to(self, starts: Sequence[int]) -> int:
        """How long a prefix shared by rows with these reply starts may be, to be encoded once: unbounded
        without "reply" steering; else it must end before every row's reply (it is encoded unsteered)."""
        if self._steering is None or self._steering.positions != "reply":
            return 10**9
        return min(starts)

    def encode_prefix(self, ids: Sequence[int]) -> Prefix:
        """Encode a prefix once (one row), to be shared by many sequences."""
        t = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None, :]
        # the shared prefix ends before every sequence's reply (callers cap it so): never "reply"-steered
        hidden, cache = self._forward(
            t, torch.ones_like(t), positions, None, torch.tensor([len(ids)], device=self.device)
        )
        return Prefix(tuple(ids), hidden[0], cache)

    def _extend(
        self,
        cache: Any,
        mask: torch.Tensor,
        start: torch.Tensor,
        tokens: Sequence[Sequence[int]],
        starts: torch.Tensor,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run right-padded token lists after each cached row (row i's first token at position start[i]);
        returns their hidden states, the grown cache and the grown mask. `starts`: each row's reply start."""
        dev = self.device
        longest = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), longest), self.pad_id, dtype=torch.long, device=dev)
        more = torch.zeros((len(tokens), longest), dtype=torch.long, device=dev)
        for i, t in enumerate(tokens):
            if t:
                ids[i, : len(t)] = torch.tensor(list(t), device=dev)
                more[i, : len(t)] = 1
        mask = torch.cat([mask, more], dim=1)
        positions = start[:, None] + torch.arange(longest, device=dev)[None, :]
        hidden, cache = self._forward(ids, mask, positions, cache, starts)
        return hidden, cache, mask

    # ----------------------------------------------------------------- scoring
    def score_many(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> Iterator[tuple[int, int, Scored]]:
        """Exact teacher-forced scores. Each distinct prompt is encoded once; its continuations (one or many
        tokens) reuse its KV cache. Prompts are batched longest first and results yielded batch by batch."""
        prompts, items = self.encode_requests(requests)
        for k, logprobs, _ in self.teacher_forced([(prompts[p], ids) for _, _, p, _, ids in items]):
            r, j, _, cont, cont_ids = items[k]
            yield r, j, Scored(cont, cont_ids, self.token_texts(cont_ids), logprobs.tolist())

    def teacher_forced(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]], *, distributions: bool = False
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Teacher-forced log-probabilities of token sequences, at the token-id level.

        For each (prefix ids, continuation ids) item, yields (item index, the log-probability of each
        continuation token [T], and with `distributions` the full next-token log-probabilities at each
        continuation position [T, V], else None), batch by batch, in any order. Each distinct prefix is
        encoded once; its continuations reuse its KV cache."""
        prefix_of: dict[tuple[int, ...], int] = {}
        by_prefix: list[list[int]] = []
        for k, (prefix, cont) in enumerate(items):
            if not cont:
                raise UserError("a continuation must have at least one token")
            self._check_length(len(prefix) + len(cont))
            p = prefix_of.setdefault(tuple(prefix), len(prefix_of))
            if p == len(by_prefix):
                by_prefix.append([])
            by_prefix[p].append(k)
        prefixes = list(prefix_of)
        cost = [len(prefixes[p]) + max(len(items[k][1]) for k in ks) for p, ks in enumerate(by_prefix)]
        order = sorted(range(len(prefixes)), key=lambda p: -cost[p])
        for batch in plan_batches(order, cost, self.token_budget, self.max_batch):
            yield from self._score_batch(
                [list(prefixes[p]) for p in batch],
                [[list(items[k][1]) for k in by_prefix[p]] for p in batch],
                [by_prefix[p] for p in batch],
                distributions,
            )

    def _score_batch(
        self,
        prompts: list[list[int]],
        conts: list[list[list[int]]],
        keys: list[list[int]],
        distributions: bool,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Score continuations of a batch of prompts: one context pass, then one pass over all continuation
        tokens (but the last) with the context cache rows repeated, chunked to the token budget."""
        enc = self.encode(prompts)
        first = self._head(enc.last_hidden())
        rows: list[tuple[int, int, list[int]]] = []  # (prompt row, key, continuation ids)
        for b, (cs, ks) in enumerate(zip(conts, keys, strict=True)):
            for c, k in zip(cs, ks, strict=True):
                if len(c) == 1:
                    yield k, first[b, c[:1]], first[b][None] if distributions else None
                else:
                    rows.append((b, k, c))
        if not rows:
            return
        width = enc.mask.shape[1]
        lengths = torch.tensor(enc.lengths, device=self.device)
        starts = torch.tensor(enc.starts, device=self.device)
        rows.sort(key=lambda x: -len(x[2]))
        # One continuation length per chunk: no padded positions, and the LM head runs once per chunk on
        # every position (in slices, to bound the [positions x vocabulary] memory).
        for length, same in itertools.groupby(rows, key=lambda x: len(x[2])):
            group = list(same)
            m = length - 1
            cost = [width + m] * len(group)
            for chunk in plan_batches(range(len(group)), cost, self.token_budget, self.max_batch * 2):
                sel = [group[i] for i in chunk]
                row_idx = torch.tensor([b for b, _, _ in sel], device=self.device)
                hidden, _, _ = self._extend(
                    _select_rows(enc.cache, row_idx),
                    enc.mask[row_idx],
                    lengths[row_idx],
                    [c[:-1] for _, _, c in sel],
                    starts[row_idx],
                )
                flat = hidden.reshape(-1, hidden.shape[-1])
                step = max(1, HEAD_POSITIONS // m) * m
                for start in range(0, len(sel) * m, step):
                    head = self._head(flat[start : start + step])
                    lp_rows = head.view(-1, m, head.shape[-1])
                    for j in range(lp_rows.shape[0]):
                        b, k, c = sel[start // m + j]
                        lp = torch.cat([first[b][None], lp_rows[j]])
                        token_lp = lp.gather(1, torch.tensor(c, device=self.device)[:, None])[:, 0]
                        yield k, token_lp, lp if distributions else None

    def token_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, list[float]]]:
        """Exact log-probability of each of the given token ids after each context (teacher forcing)."""
        encoded = [(self.encode_prompt(c), list(ids)) for c, ids in items]
        for k, token_lp, _ in self.teacher_forced(encoded):
            yield k, token_lp.tolist()

    def support_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int], int | Sequence[Sequence[int]]]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """At each position of the given tokens, the exact next-token log-probabilities on a support plus the
        log-probability of everything outside it (the remainder bucket).

        The support is an int k (this model's own top k at each position) or a list of token-id lists, one
        per position. Yields (item index, {"support": [[ids]], "logprobs": [[lp..., remainder lp]]})."""
        encoded = [(self.encode_prompt(c), list(ids)) for c, ids, _ in items]
        for k, _, dists in self.teacher_forced(encoded, distributions=True):
            support = items[k][2]
            if isinstance(support, int):
                ids = torch.topk(dists, min(support, dists.shape[-1]), dim=-1).indices
            else:
                ids = torch.tensor([list(row) for row in support], device=dists.device)
                if ids.shape[0] != dists.shape[0]:
                    raise UserError(f"support has {ids.shape[0]} positions, the tokens {dists.shape[0]}")
            chosen = dists.gather(1, ids)
            rest = dists.scatter(1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
            yield k, {"support": ids.tolist(), "logprobs": torch.cat([chosen, rest], dim=1).tolist()}

    def position_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The full next-token log-probabilities [T, V] before each of the given T tokens after each context,
        from one teacher-forced pass (not one pass per position)."""
        encoded = [(self.encode_prompt(c), list(ids)) for c, ids in items]
        for k, _, dists in self.teacher_forced(encoded, distributions=True):
            yield k, dists

    def token_ranks(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Each given token's log-probability and rank after each context (rank = 1 + the number of tokens
        strictly more probable: ties share the best rank, as vLLM's prompt_logprobs report it)."""
        for k, dists in self.position_logprobs(items):
            ids = torch.tensor(list(items[k][1]), device=dists.device)[:, None]
            chosen = dists.gather(1, ids)
            ranks = (dists > chosen).sum(dim=1) + 1
            yield k, {"logprobs": chosen[:, 0].tolist(), "ranks": ranks.tolist()}

    # ----------------------------------------------------------------- distributions
    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """Top-k of the exact next-token distribution after each context, batched."""
        if top_k < 1:
            raise UserError(f"top_k must be at least 1, not {top_k}")
        for i, lp in self.next_token_logprobs(contexts):
            values, ids = torch.topk(lp, min(top_k, lp.shape[-1]))
            id_list = [int(x) for x in ids]
            yield i, TokenDist(id_list, self.token_texts(id_list), [float(v) for v in values])

    def next_token_logprobs(self, contexts: Sequence[Context]) -> Iterator[tuple[int, torch.Tensor]]:
        """The full next-token log-probability vector after each context, batched."""
        prompts = [self.encode_prompt(c) for c in contexts]
        cost = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -cost[i])
        for batch in plan_batches(order, cost, self.token_budget, self.max_batch):
            lp = self._head(self.encode([prompts[i] for i in batch]).last_hidden())
            for row, i in enumerate(batch):
                yield i, lp[row]

    # ----------------------------------------------------------------- activations and steering
    @property
    def num_layers(self) -> int:
        """How many decoder layers the model has: activation layers are numbered 0 (embeddings) to this."""
        return len(decoder_layers(self.model))

    def activations(
        self,
        items: Sequence[Context | tuple[Context, Sequence[int]]],
        layers: Sequence[int],
        positions: str = "last",
    ) -> list[torch.Tensor]:
        """The residual stream of each item at the given layers (0 = embedding output, i = output of decoder
        layer i), as float32: "last" -> [layers, H] at the prompt's last token; "reply_mean" -> [layers, H], the
        mean over the reply tokens an item gives as (context, token ids); "all" -> [layers, T, H] at every token
        of prompt + reply. Under `steer`, the steered activations.

        Items are grouped by the prefix they share (the prompts of one mask all begin with its system prompt
        and example exchange; two masks share little more than the template's first tokens) and batched
        within a group: the prefix a batch shares, up to each prompt's last token, is encoded once (causal
        attention makes its states the same in every row), and the hooks keep only the positions asked for."""
        if positions not in ("last", "reply_mean", "all"):
            raise UserError(f"positions must be last, reply_mean or all, not {positions!r}")
        layers = check_layers(self.model, layers)
        seqs, prompt_lens = [], []
        for item in items:
            context, reply = item if isinstance(item, tuple) else (item, ())
            prompt = self.encode_prompt(context)
            if positions == "reply_mean" and not reply:
                raise UserError("positions='reply_mean' needs (context, reply token ids) items with a reply")
            seqs.append(prompt + list(reply))
            prompt_lens.append(len(prompt))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        cost = [len(s) for s in seqs]
        batches = (
            batch
            for group in _prefix_groups(seqs)
            for batch in plan_batches(group, cost, self.token_budget, self.max_batch)
        )
        for batch in batches:
            rows = [seqs[i] for i in batch]
            starts = [prompt_lens[i] - 1 for i in batch]
            # the shared prefix ends at or before every row's last prompt token, so every position read
            # ("last", the reply) lies after it; "reply" steering never reaches it (_unsteered_up_to)
            shared = (
                min(common_prefix(rows), min(starts), self._unsteered_up_to(starts)) if len(rows) > 1 else 0
            )
            prefix, before = None, None
            if shared >= MIN_SHARED:
                if positions == "all":
                    with capture(self.model, layers) as seen_prefix:
                        prefix = self.encode_prefix(rows[0][:shared])
                    # [layers, shared, H]: the prefix's states, read once for every row
                    before = torch.stack([seen_prefix[layer][0][0] for layer in layers])
                else:
                    prefix = self.encode_prefix(rows[0][:shared])
            offset = 0 if prefix is None else shared
            keep = _keeper(positions, [len(s) - offset for s in rows], [p - offset for p in starts])
            with capture(self.model, layers, keep) as seen:
                self.encode(rows, prefix=prefix, min_shared=10**9, starts=starts)
            for row, i in enumerate(batch):
                got = torch.stack([seen[layer][0][row] for layer in layers])
                out[i] = got if before is None else torch.cat([before, got], dim=1)
        return [t for t in out if t is not None]

    @contextmanager
    def steer(
        self, vector: Any, layers: Sequence[int], alpha: float = 1.0, positions: str = "reply"
    ) -> Iterator[HFModel]:
        """Every call inside the context is steered: `alpha * vector` is added to the output of each layer
        (a vector [H] for all layers, [len(layers), H], or {layer: [H]}), at the reply's positions (from the
        prompt's last token on) or at "all" positions. The fingerprint, and so every cache key, includes the
        steering. Nothing of the model is changed: on exit the hooks are gone."""
        if positions not in POSITIONS:
            raise UserError(f"steering positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        if not math.isfinite(alpha):
            raise UserError(f"alpha must be a finite number, not {alpha}")
        if self._steering is not None:
            raise UserError("steering contexts do not nest: exit the current one first")
        layers = check_layers(self.model, layers)
        hidden = self.model.get_input_embeddings().weight.shape[1]
        self._steering = Steering(as_vectors(vector, layers, hidden), float(alpha), positions)
        try:
            with steering_hooks(self.model, self._steering):
                yield self
        finally:
            self._steering = None

    # ----------------------------------------------------------------- sampling
    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams, batch_size: int = 64
    ) -> Iterator[Sample]:
        """Samples with the given indices. The prompt is encoded once; its cache is shared by a batch of
        rows of the decoding loop, each drawn with its own generator seeded from (seed, context, index).

        Per-sample generators make sample i the same whether it is drawn alone or in a batch, up to
        floating-point differences between batch shapes, which can flip a draw now and then. So batches are
        aligned blocks of indices: block b holds indices b * batch_size up to the last index wanted in it,
        and is drawn whole even when only some of it is wanted. A run interrupted while storing a block's
        samples then redraws that block exactly as the first run drew it, and resumes with the very samples
        it is missing."""
        prompt = self.encode_prompt(context)
        self._check_length(len(prompt) + params.max_new_tokens)
        wanted = set(indices)
        if not wanted:
            return
        stream = stream_key(self.render(context))
        enc = self.encode([prompt])
        last: dict[int, int] = {}
        for i in wanted:
            last[i // batch_size] = max(last.get(i // batch_size, i), i)
        for block in sorted(last):
            rows = [
                Row(
                    0,
                    len(prompt),
                    decode=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=params.seed,
                    index=i,
                    stream=stream,
                    stop=params.stop,
                )
                for i in range(block * batch_size, last[block] + 1)
            ]
            for row, res in zip(rows, self.run_rows(enc, rows, keep_logprobs=False), strict=True):
                if row.index in wanted:
                    yield Sample(row.index, res.text, res.token_ids, res.finish_reason)

    # ----------------------------------------------------------------- rows over cuts
    def run_rows(self, enc: Encoded, rows: Sequence[Row], *, keep_logprobs: bool = True) -> list[RowResult]:
        """Run a batch of rows from an encoded batch: suffixes scored, branches scored, then decoding."""
        if not rows:
            return []
        for r in rows:
            if not 1 <= r.cut <= enc.lengths[r.seq]:
                raise UserError(f"cut {r.cut} is outside a sequence of {enc.lengths[r.seq]} tokens")
            longest_branch = max((len(b) for b in r.branches), default=0)
            self._check_length(r.cut + len(r.suffix) + max(r.decode, longest_branch))
        dev = self.device
        n = len(rows)
        width = max(r.cut for r in rows)
        cache = _select_rows(enc.cache, torch.tensor([r.seq for r in rows], device=dev))
        surplus = cache.layers[0].get_seq_length() - width
        if surplus > 0:
            for layer in cache.layers:
                layer.crop(-surplus)
        cuts = torch.tensor([r.cut for r in rows], device=dev)
        starts = torch.tensor([enc.starts[r.seq] for r in rows], device=dev)
        mask = (torch.arange(width, device=dev)[None, :] < cuts[:, None]).long()
        # The LM head once per distinct (sequence, cut): sampling rows all share one.
        points = sorted({(r.seq, r.cut) for r in rows})
        at = {p: i for i, p in enumerate(points)}
        heads = self._head(
            enc.hidden_at(
                torch.tensor([s for s, _ in points], device=dev),
                torch.tensor([c - 1 for _, c in points], device=dev),
            )
        )
        first = heads[torch.tensor([at[(r.seq, r.cut)] for r in rows], device=dev)]
        lps: list[torch.Tensor | None] = [first[i][None] if keep_logprobs else None for i in range(n)]
        last = first
        if any(r.suffix for r in rows):
            hidden, cache, mask = self._extend(cache, mask, cuts, [r.suffix for r in rows], starts)
            last = first.clone()
            for i, r in enumerate(rows):
                if r.suffix and keep_logprobs:
                    after = self._head(hidden[i, : len(r.suffix)])
                    last[i] = after[-1]
                    lps[i] = torch.cat([first[i][None], after])
                elif r.suffix:
                    last[i] = self._head(hidden[i, len(r.suffix) - 1])
        next_pos = cuts + torch.tensor([len(r.suffix) for r in rows], device=dev)
        branches = self._branches(rows, cache, mask, next_pos, last, starts)
        generated = self._decode(rows, cache, mask, next_pos, last, starts)
        return [RowResult(lps[i], last[i], branches[i], *generated[i]) for i in range(n)]

    def _branches(
        self,
        rows: Sequence[Row],
        cache: Any,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        last: torch.Tensor,
        starts: torch.Tensor,
        chunk: int = 64,
    ) -> list[list[torch.Tensor]]:
        """Teacher-force every row's branches from the row's state; the row's cache is left untouched."""
        out: list[list[torch.Tensor]] = [[] for _ in rows]
        todo = [(i, b) for i, r in enumerate(rows) for b in r.branches if b]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            sel = torch.tensor([i for i, _ in part], device=self.device)
            hidden, _, _ = self._extend(
                _select_rows(cache, sel), mask[sel], next_pos[sel], [b for _, b in part], starts[sel]
            )
            for j, (i, b) in enumerate(part):
                out[i].append(torch.cat([last[i][None], self._head(hidden[j, : len(b)])]))
        return out

    def _decode(
        self,
        rows: Sequence[Row],
        cache: Any,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        logprobs: torch.Tensor,
        starts: torch.Tensor,
        compact: float = 0.75,
    ) -> list[tuple[list[int], str, str]]:
        """The one decoding loop (sampling, continuations, open forced answers). Rows with `decode` > 0
        generate; each draws from its own generator, seeded from (seed, stream, index). Finished rows stay
        in the batch (fed padding, masked out) until fewer than `compact` of the batch is alive."""
        dev = self.device
        out: list[tuple[list[int], str, str]] = [([], "", "none") for _ in rows]
        members = [i for i, r in enumerate(rows) if r.decode > 0]  # row of the batch -> row index
        if not members:
            return out
        if len(members) < len(rows):
            cache, (mask, next_pos, logprobs, starts) = _take(
                cache, torch.tensor(members, device=dev), mask, next_pos, logprobs, starts
            )
        gens = {
            i: torch.Generator(device="cpu").manual_seed(
                sample_seed(rows[i].seed, rows[i].stream, rows[i].index)
            )
            for i in members
        }
        tokens: dict[int, list[int]] = {i: [] for i in members}
        live = [True] * len(members)
        while any(live):
            picked = _pick(logprobs, [rows[i] for i in members], [gens[i] for i in members], live)
            for r, i in enumerate(members):
                if not live[r]:
                    continue
                row, tok = rows[i], picked[r]
                if tok in self.eos_ids:
                    out[i] = (tokens[i], self.decode(tokens[i]), "eos")
                    live[r] = False
                    continue
                tokens[i].append(tok)
                text = self.decode(tokens[i])
                cut = _first_stop(text, row.stop) if row.stop else None
                if cut is not None:
                    out[i] = (tokens[i], text[:cut], "stop")
                elif row.until is not None and row.until(text):
                    out[i] = (tokens[i], text, "until")
                elif len(tokens[i]) >= row.decode:
                    out[i] = (tokens[i], text, "length")
                else:
                    continue
                live[r] = False
            if not any(live):
                break
            if sum(live) < compact * len(members):
                keep = [r for r in range(len(members)) if live[r]]
                cache, (mask, next_pos, starts) = _take(
                    cache, torch.tensor(keep, device=dev), mask, next_pos, starts
                )
                members = [members[r] for r in keep]
                live = [True] * len(members)
            ids = torch.tensor(
                [[tokens[i][-1] if live[r] else self.pad_id] for r, i in enumerate(members)], device=dev
            )
            step = torch.tensor([[int(x)] for x in live], dtype=mask.dtype, device=dev)
            mask = torch.cat([mask, step], dim=1)
            hidden, cache = self._forward(ids, mask, next_pos[:, None], cache, starts)
            logprobs = self._head(hidden[:, -1])
            next_pos = next_pos + 1
        return out

    def run_cuts(
        self,
        seqs: Sequence[Sequence[int]],
        rows: Sequence[Row],
        *,
        max_rows: int = 32,
        keep_logprobs: bool = True,
        groups: Sequence[Sequence[int]] | None = None,
        starts: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, RowResult]]:
        """Run rows over many sequences; yield (row index, result) as each exists. Each sequence is encoded
        once (a prefix common to all of them once for all), batched with others, and its rows run in chunks
        of at most `max_rows`. `groups` (lists of row indices) are kept in one chunk each. `starts`: where
        each sequence's reply begins, for steering (default: its last token)."""
        if groups is None:
            groups = [[i] for i in range(len(rows))]
        if sorted(i for g in groups for i in g) != list(range(len(rows))):
            raise ValueError("groups must cover every row exactly once")
        by_seq: dict[int, list[list[int]]] = {}
        for g in groups:
            if g:
                by_seq.setdefault(rows[g[0]].seq, []).append(list(g))
        used = list(by_seq)
        if not used:
            return
        lengths = [len(seqs[s]) for s in used]
        begin = [len(s) - 1 for s in seqs] if starts is None else list(starts)
        shared = min(
            common_prefix([seqs[s] for s in used]),
            min(lengths) - 1,
            self._unsteered_up_to([begin[s] for s in used]),
        )
        prefix = self.encode_prefix(seqs[used[0]][:shared]) if shared >= MIN_SHARED else None
        counts = [sum(len(g) for g in by_seq[s]) for s in used]
        for batch in plan_batches(range(len(used)), lengths, self.token_budget, max_rows, counts):
            batch_seqs = [used[b] for b in batch]
            enc = self.encode(
                [seqs[s] for s in batch_seqs], prefix=prefix, starts=[begin[s] for s in batch_seqs]
            )
            local = {s: k for k, s in enumerate(batch_seqs)}
            chunk: list[int] = []
            pending = [g for s in batch_seqs for g in by_seq[s]]
            for gi, g in enumerate(pending):
                chunk.extend(g)
                nxt = len(pending[gi + 1]) if gi + 1 < len(pending) else 0
                if gi + 1 == len(pending) or len(chunk) + nxt > max_rows:
                    local_rows = [dataclasses.replace(rows[i], seq=local[rows[i].seq]) for i in chunk]
                    results = self.run_rows(enc, local_rows, keep_logprobs=keep_logprobs)
                    yield from zip(chunk, results, strict=True)
                    chunk = []

    # ----------------------------------------------------------------- forced answers and continuations
    def forced_answers(
        self, jobs: Sequence[ForcedJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each job's result as it exists: (job index, {"p": {candidate: exact probability as a whole word},
        "p_spellings", "open_text": the greedy continuation or None, "top": the five most probable tokens
        right after the answer prefix})."""
        order = sorted(range(len(jobs)), key=lambda j: _body_order(jobs[j].seq.ids, jobs[j].seq.prompt_len))
        seqs, index = _seq_index([jobs[j].seq.ids for j in order])
        rows = [
            Row(
                index[jobs[j].seq.ids],
                jobs[j].cut,
                jobs[j].answer_prefix,
                branches=tuple(s for c in jobs[j].candidates for s in c.spellings),
                decode=jobs[j].open_tokens,
                until=_until(jobs[j].open_until),
            )
            for j in order
        ]
        begin = _starts(seqs, [jobs[j].seq for j in order])
        for i, res in self.run_cuts(seqs, rows, max_rows=max_rows, keep_logprobs=False, starts=begin):
            yield order[i], self._forced_result(jobs[order[i]], res)

    def _forced_result(self, job: ForcedJob, res: RowResult) -> dict[str, Any]:
        continues = self._continues_word()
        probs: dict[str, float] = {}
        spelled: dict[str, list[float]] = {}
        b = 0
        for cand in job.candidates:
            parts = []
            for spelling in cand.spellings:
                lps = res.branch_logprobs[b]
                b += 1
                logp = sum(float(lps[t, tok]) for t, tok in enumerate(spelling))
                after = lps[len(spelling)]
                p_end = 1.0 - float(torch.exp(after[continues[: after.shape[0]]]).sum())
                parts.append(math.exp(logp) * max(p_end, 0.0))
            probs[cand.name] = min(sum(parts), 1.0)
            spelled[cand.name] = parts
        values, ids = torch.topk(res.next_logprobs, 5)
        top = [[self.decode([int(i)]), math.exp(float(v))] for v, i in zip(values, ids, strict=True)]
        return {
            "p": probs,
            "p_spellings": spelled,
            "open_text": res.text if job.open_tokens else None,
            "top": top,
        }

    def _continues_word(self) -> torch.Tensor:
        """Boolean mask over the vocabulary: tokens whose text starts with a letter or digit (they would
        extend the word or number before them)."""
        if self._word_mask is None:
            size = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
            flags = [bool(t) and t[0].isalnum() for t in texts]
            vocab = self.model.get_output_embeddings().weight.shape[0]
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[: min(len(flags), vocab)] = torch.tensor(flags[:vocab])
            self._word_mask = mask
        return self._word_mask

    def continuations(
        self, jobs: Sequence[ContinueJob], *, max_rows: int = 32
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each job's free continuation as it exists: (job index, {"token_ids", "text", "finish_reason"})."""
        order = sorted(range(len(jobs)), key=lambda j: _body_order(jobs[j].seq.ids, jobs[j].seq.prompt_len))
        seqs, index = _seq_index([jobs[j].seq.ids for j in order])
        rows = []
        for j in order:
            job = jobs[j]
            rows.append(
                Row(
                    index[job.seq.ids],
                    job.cut,
                    decode=job.max_new_tokens,
                    temperature=job.temperature,
                    top_p=job.top_p,
                    seed=job.seed,
                    index=job.index,
                    stream=job.stream(),
                    stop=job.stop,
                )
            )
        begin = _starts(seqs, [jobs[j].seq for j in order])
        for i, res in self.run_cuts(seqs, rows, max_rows=max_rows, keep_logprobs=False, starts=begin):
            yield order[i], {"token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason}


# ---------------------------------------------------------------------------------------------- helpers
def _take(cache: Any, sel: torch.Tensor, *rows: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The given batch rows of a KV cache and of per-row tensors."""
    return _select_rows(cache, sel), tuple(t[sel] for t in rows)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _pick(
    logprobs: torch.Tensor, rows: Sequence[Row], gens: Sequence[torch.Generator], live: list[bool]
) -> list[int]:
    """The next token of each row: greedy at temperature 0, else drawn (rows with equal settings together)."""
    picked = [int(x) for x in torch.argmax(logprobs, dim=-1)]
    groups: dict[tuple[float, float], list[int]] = {}
    for r, row in enumerate(rows):
        if live[r] and row.temperature > 0:
            groups.setdefault((row.temperature, row.top_p), []).append(r)
    for (temperature, top_p), members in groups.items():
        drawn = draw(logprobs[members], temperature, top_p, [gens[r] for r in members])
        for r, tok in zip(members, drawn, strict=True):
            picked[r] = tok
    return picked


def draw(
    logprobs: torch.Tensor, temperature: float, top_p: float, gens: Sequence[torch.Generator]
) -> list[int]:
    """One token per row by inverse CDF of the tempered (and nucleus-truncated) distribution, with one
    uniform draw per row from that row's own generator."""
    probs = torch.softmax(logprobs.double() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True)
        probs = probs * (torch.cumsum(probs, dim=-1) - probs < top_p)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).to(cdf.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        picked = order.gather(1, picked)
    return [int(x) for x in picked[:, 0]]


def _until(kind: str) -> Callable[[str], bool]:
    if kind == "number":
        return lambda text: re.search(r"\d[^\d,]", text) is not None
    if kind == "word":
        return lambda text: re.search(r"\w\W", text.lstrip()) is not None
    return lambda text: re.search(r"[.!?\n]", text.strip()) is not None


def _body_order(ids: tuple[int, ...], prompt_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sort key that puts sequences with similar bodies (same condition) together, across prompts."""
    return ids[prompt_len:], ids


def _starts(seqs: Sequence[tuple[int, ...]], owners: Sequence[Any]) -> list[int]:
    """Each distinct sequence's reply start: the last token of its prompt (its body is the reply)."""
    start = {o.ids: o.prompt_len - 1 for o in owners}
    return [start[s] for s in seqs]


def _seq_index(seqs: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    index: dict[tuple[int, ...], int] = {}
    for s in seqs:
        index.setdefault(s, len(index))
    return list(index), index


def _keeper(positions: str, lengths: Sequence[int], lasts: Sequence[int]) -> Callable[[torch.Tensor], Any]:
    """What the activation hooks keep of a batch's hidden states [B, T, H], row by row (positions counted
    from the first position of the pass): the prompt's last token, the mean over the reply, or every token."""

    def keep(hidden: torch.Tensor) -> list[torch.Tensor]:
        if positions == "last":
            return [hidden[r, p] for r, p in enumerate(lasts)]
        if positions == "reply_mean":
            return [
                hidden[r, p + 1 : n].float().mean(dim=0)
                for r, (p, n) in enumerate(zip(lasts, lengths, strict=True))
            ]
        return [hidden[r, :n] for r, n in enumerate(lengths)]

    return keep


def _prefix_groups(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of the sequences in token order, cut into runs whose neighbours share at least MIN_SHARED
    tokens (in sorted order, the prefix a run shares is the least of its neighbours' common prefixes)."""
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and common_prefix([seqs[groups[-1][-1]], seqs[i]]) >= MIN_SHARED:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
