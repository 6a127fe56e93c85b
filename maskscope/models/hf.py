"""The transformers backend: exact scoring with shared-prefix KV reuse, next-token distributions, batched
seeded sampling. Runs on CPU or GPU."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from maskscope.errors import UserError
from maskscope.models.base import (
    Context,
    ModelAPI,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
    sample_seed,
)
from maskscope.models.chat import ChatTokenizer

PRECISIONS = ("fp32", "bf16")
HEAD_POSITIONS = 512  # positions per LM-head call when scoring: bounds the [positions x vocabulary] tensor


def _batches(order: Sequence[int], cost: Sequence[int], budget: int, max_rows: int) -> Iterator[list[int]]:
    """Split `order` into consecutive batches whose padded size (rows x longest) stays within `budget`."""
    batch: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, cost[i])
        if batch and (new_longest * (len(batch) + 1) > budget or len(batch) >= max_rows):
            yield batch
            batch, new_longest = [], cost[i]
        batch.append(i)
        longest = new_longest
    if batch:
        yield batch


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new KV cache holding the given batch rows of `cache` (repeats allowed); `cache` is left untouched."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.batch_select_indices(rows)
    return new


class HFModel(ChatTokenizer, ModelAPI):
    """A transformers causal LM and its tokenizer behind the LanguageModel protocol.

    `precision="bf16"` holds the weights (and so the KV cache) in bfloat16, which CPUs with AMX multiply
    faster; log-probabilities are always computed in float32 from the logits. fp32 is the default, for
    exactness. (Autocast would cast every fp32 weight to bf16 on every call, which costs about what it saves.)
    The module is converted in place: give a copy if the fp32 model is needed alongside.
    """

    capabilities = frozenset(
        {"score", "next_token_distribution", "sample", "token_logprobs", "support_logprobs", "activations"}
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
        self.model = (model.to(torch.bfloat16) if precision == "bf16" else model).eval()
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

    # ----------------------------------------------------------------- identity and rendering
    def fingerprint(self) -> dict[str, Any]:
        """Weights hash, dtype and precision; adapters and steering add their own parts."""
        return {
            "backend": "hf",
            "weights": self.weights_digest,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "precision": self.precision,
            "chat_template": self.template_digest(),
            "adapter": self.adapter,
            "steering": None,
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

    # ----------------------------------------------------------------- forward passes
    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the vocabulary of the LM head applied to selected hidden states."""
        with torch.inference_mode():
            logits = self.model.get_output_embeddings()(hidden).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return torch.log_softmax(logits, dim=-1)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any = None):
        """Run the decoder (without the LM head, to keep memory small); return last hidden states and cache."""
        with torch.inference_mode():
            out = self.model.base_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        return out.last_hidden_state, out.past_key_values

    def _context_pass(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Encode right-padded prompts in one batch. Returns the log-probs of the next token after each
        prompt [B, V], the KV cache, the attention mask [B, L] and the prompt lengths [B]."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, device=self.device)
            mask[r, : len(p)] = 1
        positions = torch.arange(width, device=self.device).expand(len(prompts), -1)
        hidden, cache = self._forward(ids, mask, positions)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self._logprobs(last), cache, mask, lengths

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
        for batch in _batches(order, cost, self.token_budget, self.max_batch):
            yield from self._score_batch(
                [list(prefixes[p]) for p in batch],
                [[list(items[k][1]) for k in by_prefix[p]] for p in batch],
                [by_prefix[p] for p in batch],
                distributions,
            )

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

    def _score_batch(
        self,
        prompts: list[list[int]],
        conts: list[list[list[int]]],
        keys: list[list[int]],
        distributions: bool,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Score continuations of a batch of prompts: one context pass, then one pass over all continuation
        tokens (but the last) with the context cache rows repeated, chunked to the token budget."""
        first, cache, mask, lengths = self._context_pass(prompts)
        rows: list[tuple[int, int, list[int]]] = []  # (prompt row, key, continuation ids)
        for b, (cs, ks) in enumerate(zip(conts, keys, strict=True)):
            for c, k in zip(cs, ks, strict=True):
                if len(c) == 1:
                    yield k, first[b, c[:1]], first[b][None] if distributions else None
                else:
                    rows.append((b, k, c))
        if not rows:
            return
        width = mask.shape[1]
        rows.sort(key=lambda x: -len(x[2]))
        # One continuation length per chunk: no padded positions, and the LM head runs once per chunk on
        # every position (in slices, to bound the [positions x vocabulary] memory).
        for length, same in itertools.groupby(rows, key=lambda x: len(x[2])):
            group = list(same)
            m = length - 1
            cost = [width + m] * len(group)
            for chunk in _batches(range(len(group)), cost, self.token_budget, self.max_batch * 2):
                sel = [group[i] for i in chunk]
                row_idx = torch.tensor([b for b, _, _ in sel], device=self.device)
                ids = torch.tensor([c[:-1] for _, _, c in sel], dtype=torch.long, device=self.device)
                full_mask = torch.cat([mask[row_idx], torch.ones_like(ids)], dim=1)
                positions = lengths[row_idx, None] + torch.arange(m, device=self.device)[None, :]
                hidden, _ = self._forward(ids, full_mask, positions, _select_rows(cache, row_idx))
                flat = hidden.reshape(-1, hidden.shape[-1])
                step = max(1, HEAD_POSITIONS // m) * m
                for start in range(0, len(sel) * m, step):
                    head = self._logprobs(flat[start : start + step])
                    lp_rows = head.view(-1, m, head.shape[-1])
                    for j in range(lp_rows.shape[0]):
                        i = start // m + j
                        b, k, c = sel[i]
                        lp = torch.cat([first[b][None], lp_rows[j]])
                        token_lp = lp.gather(1, torch.tensor(c, device=self.device)[:, None])[:, 0]
                        yield k, token_lp, lp if distributions else None

    # ----------------------------------------------------------------- distributions
    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """Top-k of the exact next-token distribution after each context, batched."""
        for i, lp in self.next_token_logprobs(contexts):
            values, ids = torch.topk(lp, min(top_k, lp.shape[-1]))
            id_list = [int(x) for x in ids]
            yield i, TokenDist(id_list, self.token_texts(id_list), [float(v) for v in values])

    def next_token_logprobs(self, contexts: Sequence[Context]) -> Iterator[tuple[int, torch.Tensor]]:
        """The full next-token log-probability vector after each context, batched."""
        prompts = [self.encode_prompt(c) for c in contexts]
        cost = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -cost[i])
        for batch in _batches(order, cost, self.token_budget, self.max_batch):
            lp, _, _, _ = self._context_pass([prompts[i] for i in batch])
            for row, i in enumerate(batch):
                yield i, lp[row]

    # ----------------------------------------------------------------- sampling
    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams, batch_size: int = 64
    ) -> Iterator[Sample]:
        """Samples with the given indices. The prompt is encoded once; its cache is shared by a batch of
        samples, each drawn with its own generator seeded from (seed, index).

        Per-sample generators are what `generate` lacks: they make sample i the same whether it is drawn
        alone or in a batch, up to floating-point differences between batch shapes, which can flip a draw
        now and then. So batches are aligned blocks of indices: block b holds indices b * batch_size up to
        the last index wanted in it, and is drawn whole even when only some of it is wanted. A run
        interrupted while storing a block's samples then redraws that block exactly as the first run drew
        it (at the cost of redrawing what was stored), and resumes with the very samples it is missing."""
        prompt = self.encode_prompt(context)
        self._check_length(len(prompt) + params.max_new_tokens)
        wanted = set(indices)
        if not wanted:
            return
        first, cache, mask, lengths = self._context_pass([prompt])
        last: dict[int, int] = {}
        for i in wanted:
            last[i // batch_size] = max(last.get(i // batch_size, i), i)
        for block in sorted(last):
            rows = list(range(block * batch_size, last[block] + 1))
            for sample in self._sample_batch(rows, params, first, cache, len(prompt)):
                if sample.index in wanted:
                    yield sample

    def _sample_batch(
        self, indices: list[int], params: SampleParams, first: torch.Tensor, cache: Any, plen: int
    ) -> Iterator[Sample]:
        n = len(indices)
        gens = [torch.Generator(device="cpu").manual_seed(sample_seed(params.seed, i)) for i in indices]
        cache = _select_rows(cache, torch.zeros(n, dtype=torch.long, device=self.device))
        logprobs = first.expand(n, -1)
        alive = list(range(n))  # rows of the current batch -> sample position
        tokens: list[list[int]] = [[] for _ in range(n)]
        done: dict[int, Sample] = {}
        for step in range(params.max_new_tokens):
            nxt = _draw(logprobs, params, [gens[s] for s in alive])
            keep: list[int] = []
            for r, s in enumerate(alive):
                tok = nxt[r]
                if tok in self.eos_ids:
                    done[s] = Sample(indices[s], self._decode(tokens[s]), tokens[s], "eos")
                    continue
                tokens[s].append(tok)
                cut = _first_stop(self._decode(tokens[s]), params.stop) if params.stop else None
                if cut is not None:
                    done[s] = Sample(indices[s], self._decode(tokens[s])[:cut], tokens[s], "stop")
                elif step == params.max_new_tokens - 1:
                    done[s] = Sample(indices[s], self._decode(tokens[s]), tokens[s], "length")
                else:
                    keep.append(r)
            if not keep:
                break
            rows = torch.tensor(keep, device=self.device)
            if len(keep) < len(alive):
                cache = _select_rows(cache, rows)
            alive = [alive[r] for r in keep]
            ids = torch.tensor([[tokens[s][-1]] for s in alive], device=self.device)
            pos = plen + step
            mask = torch.ones((len(alive), pos + 1), dtype=torch.long, device=self.device)
            positions = torch.full((len(alive), 1), pos, device=self.device)
            hidden, cache = self._forward(ids, mask, positions, cache)
            logprobs = self._logprobs(hidden[:, -1])
        for s in range(n):
            yield done[s]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _draw(logprobs: torch.Tensor, params: SampleParams, gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row: greedy at temperature 0; else by inverse CDF of the tempered (and nucleus-
    truncated) distribution, with one uniform draw per row from that row's own generator."""
    if params.temperature == 0:
        return [int(x) for x in torch.argmax(logprobs, dim=-1)]
    probs = torch.softmax(logprobs.double() / params.temperature, dim=-1)
    order = None
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True)
        probs = probs * (torch.cumsum(probs, dim=-1) - probs < params.top_p)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).to(cdf.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        picked = order.gather(1, picked)
    return [int(x) for x in picked[:, 0]]
