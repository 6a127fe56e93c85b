"""Store-backed jobs on top of the KV engine: forced answers and free continuations from cut sequences.

A job names a sequence (a rendered prompt's tokens followed by body tokens, e.g. a chain of thought) and a
cut. Its cache key holds the model's fingerprint, the rendered prompt, the method, the body tokens up to the
cut and every argument, so a job's result does not depend on how it was batched, and a rerun after a crash
computes only what is missing. Jobs that share a sequence share its encoding (see `maskscope.reasoning.kv`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from maskscope.models.base import Context, SampleParams
from maskscope.models.hf import HFModel
from maskscope.reasoning.kv import Row, RowResult, as_hf, run_jobs
from maskscope.store import call_key

FORCED = "reasoning.forced"
CONTINUE = "reasoning.continue"


@dataclass(frozen=True)
class Seq:
    """A rendered prompt's tokens followed by body tokens; `prompt_len` tokens belong to the prompt."""

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
        """The job's arguments, as they enter its cache key."""
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
    the generator of (seed, index)."""

    seq: Seq
    cut: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    stop: tuple[str, ...] = ()

    def args(self) -> dict[str, Any]:
        """The job's arguments, as they enter its cache key."""
        params = SampleParams(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop)
        return {"body": self.seq.body(self.cut), **params.to_json(), "index": self.index}


def _continues_word(hf: HFModel) -> torch.Tensor:
    """Boolean mask over the vocabulary: tokens whose text starts with a letter or digit (they would extend
    the word or number before them)."""
    cached = getattr(hf, "_maskscope_continues_word", None)
    if cached is not None:
        return cached
    size = len(hf.tokenizer)
    texts = hf.tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    flags = [bool(t) and t[0].isalnum() for t in texts]
    vocab = hf.model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[: len(flags)] = torch.tensor(flags[:vocab])
    hf._maskscope_continues_word = mask  # type: ignore[attr-defined]
    return mask


def _until(kind: str) -> Callable[[str], bool]:
    if kind == "number":
        return lambda text: re.search(r"\d[^\d,]", text) is not None
    if kind == "word":
        return lambda text: re.search(r"\w\W", text.lstrip()) is not None
    return lambda text: re.search(r"[.!?\n]", text.strip()) is not None


def _body_order(seq: Seq) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sort key that puts sequences with similar bodies (same condition) together, across prompts."""
    return seq.ids[seq.prompt_len :], seq.ids


class Jobs:
    """Runs forced-answer and continuation jobs for a model, through its store when it has one."""

    def __init__(self, model: Any, *, max_rows: int = 32, what: str = "this experiment") -> None:
        self.model = model
        self.hf = as_hf(model, what)
        self.store = getattr(model, "store", None)
        self.fingerprint = model.fingerprint()
        self.max_rows = max_rows
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ helpers
    def seq(self, context: Context, body: Sequence[int] = ()) -> Seq:
        """The sequence of a context's rendered prompt followed by body tokens."""
        prompt = self.hf.encode_prompt(context)
        return Seq(self.hf.render(context), tuple(prompt) + tuple(body), len(prompt))

    def tokens(self, text: str) -> tuple[int, ...]:
        """Token ids of a text on its own (no special tokens added)."""
        return tuple(self.hf.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.hf.tokenizer.decode(list(ids), skip_special_tokens=True)

    def candidate(self, name: str, spellings: Sequence[str]) -> Candidate:
        """A candidate with its spellings tokenized on their own, duplicates removed."""
        seen: list[tuple[int, ...]] = []
        for s in spellings:
            ids = self.tokens(s)
            if ids and ids not in seen:
                seen.append(ids)
        return Candidate(name, tuple(seen))

    def _key(self, method: str, seq: Seq, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        parts = {"model": self.fingerprint, "method": method, "prompt": seq.prompt_text, "args": args}
        return call_key(parts), parts

    def _get(self, key: str, method: str) -> Any | None:
        if self.store is None:
            self.misses += 1
            return None
        found = self.store.get(key, method)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def _put(self, key: str, parts: dict[str, Any], result: Any) -> None:
        if self.store is not None:
            self.store.put(key, parts, result)

    # ------------------------------------------------------------------ forced answers
    def forced(
        self, jobs: Sequence[ForcedJob], advance: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Each job's result: {"p": {candidate: exact probability}, "open_text": greedy text or None,
        "top": the five most probable tokens right after the answer prefix}."""
        out: list[dict[str, Any] | None] = [None] * len(jobs)
        todo: list[tuple[int, str, dict[str, Any]]] = []
        twins: dict[str, list[int]] = {}
        for j, job in enumerate(jobs):
            key, parts = self._key(FORCED, job.seq, job.args())
            if key in twins:
                twins[key].append(j)
                continue
            twins[key] = [j]
            found = self._get(key, FORCED)
            if found is None:
                todo.append((j, key, parts))
            else:
                out[j] = found
        if advance:
            advance(len(jobs) - sum(len(twins[key]) for _, key, _ in todo))
        if todo:
            todo.sort(key=lambda t: _body_order(jobs[t[0]].seq))
            seqs, index = self._seq_index([jobs[j].seq for j, _, _ in todo])
            rows: list[Row] = []
            for j, _, _ in todo:
                job = jobs[j]
                rows.append(
                    Row(
                        index[job.seq.ids],
                        job.cut,
                        job.answer_prefix,
                        branches=tuple(s for c in job.candidates for s in c.spellings),
                        decode=job.open_tokens,
                        until=_until(job.open_until),
                    )
                )
            continues = _continues_word(self.hf)

            def collect(i: int, res: RowResult) -> None:
                j, key, parts = todo[i]
                result = self._forced_result(jobs[j], res, continues)
                self._put(key, parts, result)
                out[j] = result
                if advance:
                    advance(len(twins[key]))

            run_jobs(self.hf, seqs, rows, max_rows=self.max_rows, keep_logprobs=False, on_result=collect)
        return self._fill(out, twins)

    def _forced_result(self, job: ForcedJob, res: RowResult, continues: torch.Tensor) -> dict[str, Any]:
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
        top: list[list[Any]] = []
        if res.next_logprobs is not None:
            values, ids = torch.topk(res.next_logprobs, 5)
            top = [[self.decode([int(i)]), math.exp(float(v))] for v, i in zip(values, ids, strict=True)]
        return {
            "p": probs,
            "p_spellings": spelled,
            "open_text": res.text if job.open_tokens else None,
            "top": top,
        }

    # ------------------------------------------------------------------ continuations
    def continued(
        self, jobs: Sequence[ContinueJob], advance: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Each job's result: {"token_ids", "text", "finish_reason"} of the continuation."""
        out: list[dict[str, Any] | None] = [None] * len(jobs)
        todo: list[tuple[int, str, dict[str, Any]]] = []
        twins: dict[str, list[int]] = {}
        for j, job in enumerate(jobs):
            key, parts = self._key(CONTINUE, job.seq, job.args())
            if key in twins:
                twins[key].append(j)
                continue
            twins[key] = [j]
            found = self._get(key, CONTINUE)
            if found is None:
                todo.append((j, key, parts))
            else:
                out[j] = found
        if advance:
            advance(len(jobs) - sum(len(twins[key]) for _, key, _ in todo))
        if todo:
            todo.sort(key=lambda t: _body_order(jobs[t[0]].seq))
            seqs, index = self._seq_index([jobs[j].seq for j, _, _ in todo])
            rows = []
            for j, _, _ in todo:
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
                        stop=job.stop,
                    )
                )

            def collect(i: int, res: RowResult) -> None:
                j, key, parts = todo[i]
                result = {"token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason}
                self._put(key, parts, result)
                out[j] = result
                if advance:
                    advance(len(twins[key]))

            run_jobs(self.hf, seqs, rows, max_rows=self.max_rows, keep_logprobs=False, on_result=collect)
        return self._fill(out, twins)

    @staticmethod
    def _fill(out: list[dict[str, Any] | None], twins: dict[str, list[int]]) -> list[dict[str, Any]]:
        for same in twins.values():
            for j in same[1:]:
                out[j] = out[same[0]]
        missing = [j for j, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"jobs without a result: {missing[:5]}")
        return [r for r in out if r is not None]

    @staticmethod
    def _seq_index(seqs: Sequence[Seq]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
        index: dict[tuple[int, ...], int] = {}
        for s in seqs:
            index.setdefault(s.ids, len(index))
        return list(index), index
