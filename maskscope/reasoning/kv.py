"""KV-cache reuse across truncation points, on top of the transformers backend's internals.

A question + chain of thought is encoded once, keeping its KV cache and hidden states. Each row asks for the
sequence cut at some token (`cut`), optionally followed by a few more tokens (`suffix`, e.g. "The answer is"
and a candidate answer): the row gets a copy of the cache, cropped to the longest cut of its batch, with the
positions past its own cut masked out; its suffix is then run from there. The log-probabilities equal those of
encoding `seq[:cut] + suffix` from scratch (tested to 1e-4), at the cost of the suffix tokens alone.

The same row state continues into batched decoding (greedy or seeded sampling, one generator per row, as
`HFModel.sample_indices` draws), so free continuations from many cuts of many sequences run in one batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from maskscope.errors import UserError
from maskscope.models.base import SampleParams, sample_seed
from maskscope.models.hf import HFModel, _draw, _first_stop, _select_rows


def as_hf(model: Any, what: str) -> HFModel:
    """The transformers model behind a (possibly store-backed) model; a one-line error for other backends."""
    inner = getattr(model, "inner", model)
    if not isinstance(inner, HFModel):
        raise UserError(
            f"{what} needs the transformers backend (default, hf:DIR or gguf:FILE), not {model.name}"
        )
    return inner


@dataclass(frozen=True)
class Row:
    """One row of a batch: the sequence `seq` (an index into the encoded batch) cut at `cut` tokens, then
    `suffix` run after it. Each of `branches` is teacher-forced after the suffix (e.g. candidate answers);
    `decode` > 0 asks for that many tokens to be generated after the suffix."""

    seq: int
    cut: int
    suffix: tuple[int, ...] = ()
    branches: tuple[tuple[int, ...], ...] = ()
    decode: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    stop: tuple[str, ...] = ()
    until: Callable[[str], bool] | None = field(default=None, compare=False)


@dataclass
class RowResult:
    """What a row produced.

    `logprobs`: next-token log-probabilities before each suffix token and after the last
    ([len(suffix) + 1, V], if asked); `next_logprobs`: the last of these [V]. `branch_logprobs[b]`: the same
    along branch b, starting after the suffix ([len(branch) + 1, V]). Then the generated token ids, text and
    finish reason."""

    logprobs: torch.Tensor | None
    next_logprobs: torch.Tensor
    branch_logprobs: list[torch.Tensor]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class Encoded:
    """A batch of sequences encoded once: the KV cache [S rows, width W], the hidden states of the prefix all
    sequences share [L, H] and of the rest [S, W - L, H], and the sequences' lengths."""

    cache: Any
    prefix_hidden: torch.Tensor | None
    body_hidden: torch.Tensor
    lengths: list[int]

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


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@dataclass
class Prefix:
    """A prefix encoded once (one row): its token ids, hidden states [L, H] and KV cache."""

    ids: tuple[int, ...]
    hidden: torch.Tensor
    cache: Any


def encode_prefix(hf: HFModel, ids: Sequence[int]) -> Prefix:
    """Encode a prefix once, to be shared by many sequences."""
    t = torch.tensor([list(ids)], device=hf.device)
    hidden, cache = hf._forward(t, torch.ones_like(t), torch.arange(len(ids), device=hf.device)[None, :])
    return Prefix(tuple(ids), hidden[0], cache)


def encode(
    hf: HFModel, seqs: Sequence[Sequence[int]], *, prefix: Prefix | None = None, min_shared: int = 8
) -> Encoded:
    """Encode right-padded sequences, keeping the cache and every position's hidden state. A prefix they all
    share is encoded once: `prefix` if given (it must be shorter than every sequence), else their longest
    common prefix (if at least `min_shared` tokens); its cache is repeated for the rest."""
    if not seqs or any(not s for s in seqs):
        raise UserError("every sequence must have at least one token")
    for s in seqs:
        hf._check_length(len(s))
    dev = hf.device
    if prefix is None and len(seqs) > 1:
        shared = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)
        if shared >= min_shared:
            prefix = encode_prefix(hf, seqs[0][:shared])
    if prefix is not None and any(
        len(s) <= len(prefix.ids) or tuple(s[: len(prefix.ids)]) != prefix.ids for s in seqs
    ):
        raise ValueError("the shared prefix must be a proper prefix of every sequence")
    shared = 0 if prefix is None else len(prefix.ids)
    cache = None
    if prefix is not None:
        cache = _select_rows(prefix.cache, torch.zeros(len(seqs), dtype=torch.long, device=dev))
    width = max(len(s) for s in seqs) - shared
    ids = torch.full((len(seqs), width), hf.pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((len(seqs), shared + width), dtype=torch.long, device=dev)
    for r, s in enumerate(seqs):
        ids[r, : len(s) - shared] = torch.tensor(list(s[shared:]), device=dev)
        mask[r, : len(s)] = 1
    positions = shared + torch.arange(width, device=dev).expand(len(seqs), -1)
    hidden, cache = hf._forward(ids, mask, positions, cache)
    return Encoded(cache, None if prefix is None else prefix.hidden, hidden, [len(s) for s in seqs])


def run_rows(
    hf: HFModel, enc: Encoded, rows: Sequence[Row], *, keep_logprobs: bool = True
) -> list[RowResult]:
    """Run a batch of rows from an encoded batch: suffixes scored, branches scored, then decoding."""
    if not rows:
        return []
    for r in rows:
        if not 1 <= r.cut <= enc.lengths[r.seq]:
            raise UserError(f"cut {r.cut} is outside a sequence of {enc.lengths[r.seq]} tokens")
        longest_branch = max((len(b) for b in r.branches), default=0)
        hf._check_length(r.cut + len(r.suffix) + max(r.decode, longest_branch))
    dev = hf.device
    n = len(rows)
    width = max(r.cut for r in rows)
    cache = _select_rows(enc.cache, torch.tensor([r.seq for r in rows], device=dev))
    surplus = cache.layers[0].get_seq_length() - width
    if surplus > 0:
        for layer in cache.layers:
            layer.crop(-surplus)
    cuts = torch.tensor([r.cut for r in rows], device=dev)
    mask = (torch.arange(width, device=dev)[None, :] < cuts[:, None]).long()
    seq_idx = torch.tensor([r.seq for r in rows], device=dev)
    first = hf._logprobs(enc.hidden_at(seq_idx, cuts - 1))
    lps: list[torch.Tensor | None] = [first[i][None] if keep_logprobs else None for i in range(n)]
    last = first
    longest = max(len(r.suffix) for r in rows)
    if longest:
        hidden, cache, mask = _extend(hf, cache, mask, cuts, [r.suffix for r in rows])
        last = first.clone()
        for i, r in enumerate(rows):
            if r.suffix and keep_logprobs:
                after = hf._logprobs(hidden[i, : len(r.suffix)])
                last[i] = after[-1]
                lps[i] = torch.cat([first[i][None], after])
            elif r.suffix:
                last[i] = hf._logprobs(hidden[i, len(r.suffix) - 1])
    next_pos = cuts + torch.tensor([len(r.suffix) for r in rows], device=dev)
    branches = _branches(hf, rows, cache, mask, next_pos, last)
    generated = _decode(hf, rows, cache, mask, next_pos, last)
    return [RowResult(lps[i], last[i], branches[i], *generated[i]) for i in range(n)]


def _extend(
    hf: HFModel, cache: Any, mask: torch.Tensor, start: torch.Tensor, tokens: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run right-padded token lists after each row (row i's first token at position start[i])."""
    dev = hf.device
    longest = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), longest), hf.pad_id, dtype=torch.long, device=dev)
    more = torch.zeros((len(tokens), longest), dtype=torch.long, device=dev)
    for i, t in enumerate(tokens):
        if t:
            ids[i, : len(t)] = torch.tensor(list(t), device=dev)
            more[i, : len(t)] = 1
    mask = torch.cat([mask, more], dim=1)
    positions = start[:, None] + torch.arange(longest, device=dev)[None, :]
    hidden, cache = hf._forward(ids, mask, positions, cache)
    return hidden, cache, mask


def _branches(
    hf: HFModel,
    rows: Sequence[Row],
    cache: Any,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    last: torch.Tensor,
    chunk: int = 64,
) -> list[list[torch.Tensor]]:
    """Teacher-force every row's branches from the row's state; the row's cache is left untouched."""
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    todo = [(i, b) for i, r in enumerate(rows) for b in r.branches if b]
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        sel = torch.tensor([i for i, _ in part], device=hf.device)
        hidden, _, _ = _extend(hf, _select_rows(cache, sel), mask[sel], next_pos[sel], [b for _, b in part])
        for j, (i, b) in enumerate(part):
            out[i].append(torch.cat([last[i][None], hf._logprobs(hidden[j, : len(b)])]))
    return out


def _decode(
    hf: HFModel,
    rows: Sequence[Row],
    cache: Any,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    logprobs: torch.Tensor,
    compact: float = 0.75,
) -> list[tuple[list[int], str, str]]:
    """Generate for the rows that ask for it; one generator per row, seeded from (seed, index). Finished rows
    stay in the batch (fed padding, masked out) until fewer than `compact` of the batch is alive."""
    dev = hf.device
    out: list[tuple[list[int], str, str]] = [([], "", "none") for _ in rows]
    members = [i for i, r in enumerate(rows) if r.decode > 0]  # row of the batch -> row index
    if not members:
        return out
    if len(members) < len(rows):
        sel = torch.tensor(members, device=dev)
        cache, mask, next_pos, logprobs = _select_rows(cache, sel), mask[sel], next_pos[sel], logprobs[sel]
    gens = {
        i: torch.Generator(device="cpu").manual_seed(sample_seed(rows[i].seed, rows[i].index))
        for i in members
    }
    tokens: dict[int, list[int]] = {i: [] for i in members}
    live = [True] * len(members)
    while any(live):
        picked = [int(x) for x in torch.argmax(logprobs, dim=-1)]
        for r, i in enumerate(members):
            if live[r] and rows[i].temperature > 0:
                params = SampleParams(1, rows[i].temperature, rows[i].top_p)
                picked[r] = _draw(logprobs[r : r + 1], params, [gens[i]])[0]
        for r, i in enumerate(members):
            if not live[r]:
                continue
            row, tok = rows[i], picked[r]
            if tok in hf.eos_ids:
                out[i] = (tokens[i], hf._decode(tokens[i]), "eos")
                live[r] = False
                continue
            tokens[i].append(tok)
            text = hf._decode(tokens[i])
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
            sel = torch.tensor(keep, device=dev)
            cache, mask, next_pos = _select_rows(cache, sel), mask[sel], next_pos[sel]
            members = [members[r] for r in keep]
            live = [True] * len(members)
        ids = torch.tensor(
            [[tokens[i][-1] if live[r] else hf.pad_id] for r, i in enumerate(members)], device=dev
        )
        step = torch.tensor([[int(x)] for x in live], dtype=mask.dtype, device=dev)
        mask = torch.cat([mask, step], dim=1)
        hidden, cache = hf._forward(ids, mask, next_pos[:, None], cache)
        logprobs = hf._logprobs(hidden[:, -1])
        next_pos = next_pos + 1
    return out


def plan_batches(
    seq_lengths: Sequence[int], rows_per_seq: Sequence[int], *, token_budget: int, max_rows: int
) -> list[list[int]]:
    """Split sequence indices, in order, into consecutive batches whose encoding (sequences x longest) and
    rows stay in budget. A sequence with more rows than `max_rows` forms a batch of its own (its rows are run
    in chunks)."""
    order = range(len(seq_lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = rows = 0
    for s in order:
        new_longest = max(longest, seq_lengths[s])
        if current and (new_longest * (len(current) + 1) > token_budget or rows + rows_per_seq[s] > max_rows):
            batches.append(current)
            current, new_longest, rows = [], seq_lengths[s], 0
        current.append(s)
        longest = new_longest
        rows += rows_per_seq[s]
    if current:
        batches.append(current)
    return batches


def run_jobs(
    hf: HFModel,
    seqs: Sequence[Sequence[int]],
    rows: Sequence[Row],
    *,
    max_rows: int = 32,
    keep_logprobs: bool = True,
    on_result: Callable[[int, RowResult], None] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
) -> list[RowResult]:
    """Run rows over many sequences: each sequence is encoded once, batched with others, and its rows are
    run in chunks of at most `max_rows`. `groups` (lists of row indices) are kept in one chunk each.
    `on_result(row index, result)` is called as each row's result exists."""
    results: list[RowResult | None] = [None] * len(rows)
    if groups is None:
        groups = [[i] for i in range(len(rows))]
    if sorted(i for g in groups for i in g) != list(range(len(rows))):
        raise ValueError("groups must cover every row exactly once")
    by_seq: dict[int, list[list[int]]] = {}
    for g in groups:
        if g:
            by_seq.setdefault(rows[g[0]].seq, []).append(list(g))
    used = list(by_seq)
    lengths = [len(seqs[s]) for s in used]
    shared = min(common_prefix([seqs[s] for s in used]), min(lengths) - 1) if used else 0
    prefix = encode_prefix(hf, seqs[used[0]][:shared]) if shared >= 8 else None
    counts = [sum(len(g) for g in by_seq[s]) for s in used]
    for batch in plan_batches(lengths, counts, token_budget=hf.token_budget, max_rows=max_rows):
        batch_seqs = [used[b] for b in batch]
        enc = encode(hf, [seqs[s] for s in batch_seqs], prefix=prefix)
        local = {s: k for k, s in enumerate(batch_seqs)}
        chunk: list[int] = []
        pending = [g for s in batch_seqs for g in by_seq[s]]
        for gi, g in enumerate(pending):
            chunk.extend(g)
            nxt = len(pending[gi + 1]) if gi + 1 < len(pending) else 0
            if gi + 1 == len(pending) or len(chunk) + nxt > max_rows:
                local_rows = [_relocate(rows[i], local[rows[i].seq]) for i in chunk]
                for i, res in zip(
                    chunk, run_rows(hf, enc, local_rows, keep_logprobs=keep_logprobs), strict=True
                ):
                    results[i] = res
                    if on_result is not None:
                        on_result(i, res)
                chunk = []
    return [r for r in results if r is not None]


def _relocate(row: Row, seq: int) -> Row:
    return dataclasses.replace(row, seq=seq)
