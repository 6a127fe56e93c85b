"""The `posterior` experiment: reading a transcript token by token, which mask is speaking?

For each mask m of a library and each token x_t of the transcript's assistant turns, the exact log-probability
log p(x_t | x_<t, conditioning of m) comes from one teacher-forced pass per mask and assistant turn (the mask's
prompt encoded once, its KV cache reused). Two posteriors are computed from these numbers, both exact:

- static: the mask is fixed for the whole transcript, so P(m | x_<=t) is proportional to
  prior(m) * prod_{s<=t} p(x_s | x_<s, m) (cumulative Bayes);
- switching: the speaking mask may change between tokens with probability `switch_rate` (a hidden Markov
  model whose emissions are the per-token probabilities above). Filtering gives P(m_t | x_<=t), smoothing
  (forward-backward) P(m_t | all tokens), and the Viterbi path the most probable sequence of speakers, whose
  changes are the reported switch points.

A negative control can ride along (`negative_control`): replies sampled from one library mask and read back
the same way. One speaker wrote each, so the switching model should report no switch; a switch there is a
false alarm of the method (or masks too alike to tell apart), and the share of replies with one is reported
with its Wilson interval.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import logsumexp

from maskscope.errors import UserError
from maskscope.experiments.spec import LibrarySpec
from maskscope.masks import MaskLibrary, Turn
from maskscope.models.base import LanguageModel, SampleParams, require
from maskscope.progress import Progress, Silent
from maskscope.stats import share_ci


class NegativeControl(BaseModel):
    """Replies sampled from one mask and read back: one speaker, so no switch is expected."""

    model_config = ConfigDict(extra="forbid")
    mask: str = Field(description="The library mask that speaks every control reply.")
    user: str = Field(description="The user turn the replies answer.")
    samples: int = Field(6, ge=1, le=1000, description="Control replies sampled.")
    max_new_tokens: int = Field(40, ge=1, le=2048, description="Length limit of each control reply.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the control replies.")
    seed: int = Field(0, description="Seed: reply i is a function of (seed, i).")


class PosteriorSpec(LibrarySpec):
    """Which mask is speaking in a transcript, token by token."""

    experiment: Literal["posterior"] = "posterior"
    transcript: list[Turn] = Field(min_length=1, description="The dialogue; its assistant turns are read.")
    switch_rate: float = Field(
        0.01, gt=0, lt=1, description="Per-token probability that the speaker changes."
    )
    negative_control: NegativeControl | None = Field(
        None, description="Replies sampled from one mask, read back: zero switches expected."
    )

    def limited(self, n: int) -> PosteriorSpec:
        """`--limit N`: the transcript up to and including its N-th assistant turn."""
        kept: list[dict[str, Any]] = []
        replies = 0
        for turn in self.transcript:
            if replies == n:
                break
            kept.append(turn.model_dump())
            replies += turn.role == "assistant"
        return self._replaced(transcript=kept)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _has_reply(self) -> PosteriorSpec:
        if not any(t.role == "assistant" for t in self.transcript):
            raise ValueError("the transcript has no assistant turn to read")
        return self


@dataclass
class PosteriorResult:
    """Per-token numbers, as arrays: T tokens (of the assistant turns, in order) x M masks; logs are natural."""

    masks: list[str]
    token_ids: list[int]
    tokens: list[str]
    turn: np.ndarray  # [T] index of the transcript turn each token belongs to
    loglik: np.ndarray  # [T, M] log p(x_t | x_<t, mask)
    log_prior: np.ndarray  # [M]
    static: np.ndarray  # [T, M] log P(mask | x_<=t), the mask fixed for the whole transcript
    filtered: np.ndarray  # [T, M] log P(mask_t | x_<=t), switching model
    smoothed: np.ndarray  # [T, M] log P(mask_t | all tokens), switching model
    viterbi: np.ndarray  # [T] most probable speaker at each token (mask indices)
    switch_rate: float

    def switches(self, which: str = "viterbi") -> list[dict[str, Any]]:
        """Positions where the most probable mask changes: {"position", "from", "to", "token"}.

        `which` is "viterbi" (the switching model's best path), "smoothed", "filtered" or "static"."""
        path = self.viterbi if which == "viterbi" else np.argmax(getattr(self, which), axis=1)
        return [
            {
                "position": t,
                "from": self.masks[path[t - 1]],
                "to": self.masks[path[t]],
                "token": self.tokens[t],
            }
            for t in range(1, len(path))
            if path[t] != path[t - 1]
        ]

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per token: text, log-likelihood and posteriors per mask."""
        rows = []
        for t in range(len(self.tokens)):
            row: dict[str, Any] = {"position": t, "token": self.tokens[t], "turn": int(self.turn[t])}
            for m, name in enumerate(self.masks):
                row[f"loglik[{name}]"] = float(self.loglik[t, m])
                row[f"static[{name}]"] = float(np.exp(self.static[t, m]))
                row[f"smoothed[{name}]"] = float(np.exp(self.smoothed[t, m]))
            rows.append(row)
        return rows


def switching_posteriors(
    loglik: np.ndarray, log_prior: np.ndarray, switch_rate: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filtered and smoothed log-posteriors and the Viterbi path of a hidden Markov model whose state (the
    speaking mask) stays with probability 1 - switch_rate and otherwise moves to any other mask uniformly.

    Written out here (forward-backward and Viterbi in log space, a dozen lines) rather than taken from an HMM
    library, since the emissions are given numbers, not a fitted distribution."""
    n_tokens, n_masks = loglik.shape
    if n_masks == 1:
        zeros = np.zeros_like(loglik)
        return zeros, zeros, np.zeros(n_tokens, dtype=int)
    stay, move = np.log1p(-switch_rate), np.log(switch_rate / (n_masks - 1))
    log_a = np.full((n_masks, n_masks), move)
    np.fill_diagonal(log_a, stay)
    alpha = np.empty_like(loglik)
    alpha[0] = log_prior + loglik[0]
    for t in range(1, n_tokens):
        alpha[t] = loglik[t] + logsumexp(alpha[t - 1][:, None] + log_a, axis=0)
    beta = np.zeros_like(loglik)
    for t in range(n_tokens - 2, -1, -1):
        beta[t] = logsumexp(log_a + (loglik[t + 1] + beta[t + 1])[None, :], axis=1)
    filtered = alpha - logsumexp(alpha, axis=1, keepdims=True)
    smoothed = alpha + beta
    smoothed -= logsumexp(smoothed, axis=1, keepdims=True)
    delta = log_prior + loglik[0]
    back = np.zeros((n_tokens, n_masks), dtype=int)
    for t in range(1, n_tokens):
        scores = delta[:, None] + log_a
        back[t] = np.argmax(scores, axis=0)
        delta = scores[back[t], np.arange(n_masks)] + loglik[t]
    path = np.empty(n_tokens, dtype=int)
    path[-1] = int(np.argmax(delta))
    for t in range(n_tokens - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return filtered, smoothed, path


def mask_posterior(
    model: LanguageModel,
    library: MaskLibrary,
    transcript: list[Turn] | str,
    *,
    user: str | None = None,
    switch_rate: float = 0.01,
    progress: Progress | None = None,
) -> PosteriorResult:
    """Which mask is speaking, token by token. `transcript` is a list of turns, or the text of one assistant
    reply (answering `user`, if given)."""
    require(model, "token_logprobs", "the mask posterior")
    if isinstance(transcript, str):
        transcript = ([Turn(role="user", content=user)] if user is not None else []) + [
            Turn(role="assistant", content=transcript)
        ]
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    turns = [i for i, t in enumerate(transcript) if t.role == "assistant"]
    ids = {i: list(tokenizer(transcript[i].content, add_special_tokens=False)["input_ids"]) for i in turns}
    if not any(ids.values()):
        raise UserError("the transcript's assistant turns are empty")
    items, where = [], []
    for m, mask in enumerate(library.masks):
        for i in turns:
            if ids[i]:
                items.append((mask.conversation(transcript[:i]), ids[i]))
                where.append((m, i))
    advance = (progress or Silent()).task("exact: transcript under each mask", len(items))
    per_turn: dict[tuple[int, int], list[float]] = {}
    for k, logprobs in model.token_logprobs(items):
        per_turn[where[k]] = logprobs
        advance(1)
    token_ids = [x for i in turns for x in ids[i]]
    loglik = np.array(
        [[lp for i in turns if ids[i] for lp in per_turn[(m, i)]] for m in range(len(library.masks))]
    ).T
    log_prior = np.array(library.log_priors())
    cumulative = np.cumsum(loglik, axis=0) + log_prior
    static = cumulative - logsumexp(cumulative, axis=1, keepdims=True)
    filtered, smoothed, path = switching_posteriors(loglik, log_prior, switch_rate)
    return PosteriorResult(
        masks=library.names,
        token_ids=token_ids,
        tokens=[tokenizer.decode([x]) for x in token_ids],
        turn=np.array([i for i in turns for _ in ids[i]]),
        loglik=loglik,
        log_prior=log_prior,
        static=static,
        filtered=filtered,
        smoothed=smoothed,
        viterbi=path,
        switch_rate=switch_rate,
    )


def run(model: LanguageModel, spec: PosteriorSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment; the per-token table is in the summary's `tokens` and written as CSV by `plots`."""
    library = spec.mask_library()
    if spec.negative_control is not None:  # refuse an unknown mask before any work
        library.get(spec.negative_control.mask)
    result = mask_posterior(model, library, spec.transcript, switch_rate=spec.switch_rate, progress=progress)
    final_static = np.exp(result.static[-1])
    control = None if spec.negative_control is None else negative_control(model, library, spec, progress)
    return {
        "experiment": "posterior",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "masks": result.masks,
        "prior": np.exp(result.log_prior).tolist(),
        "final_static_posterior": dict(zip(result.masks, final_static.tolist(), strict=True)),
        "total_loglik": dict(zip(result.masks, result.loglik.sum(axis=0).tolist(), strict=True)),
        "switches": {w: result.switches(w) for w in ("smoothed", "viterbi", "static")},
        "speaker_viterbi": [result.masks[i] for i in result.viterbi],
        "speaker_smoothed": [result.masks[i] for i in np.argmax(result.smoothed, axis=1)],
        "tokens": result.to_rows(),
        "negative_control": control,
        "definitions": {
            "static": "Exact. P(mask | tokens so far), the mask fixed for the whole transcript (cumulative Bayes).",
            "smoothed": (
                f"Exact under a switching model: the speaking mask changes between tokens with probability "
                f"{spec.switch_rate}; P(mask at t | all tokens) by forward-backward. Switches: where its most "
                "probable mask changes (smoothed), or where the most probable sequence of speakers changes (viterbi)."
            ),
            "negative_control": (
                "Replies sampled from one mask (temperature and seed as given) and read back with the same "
                "library and switch rate. Expected: no switch. Share of replies with a Viterbi switch: "
                "sampled, Wilson 95% interval over replies."
            ),
        },
    }


def negative_control(
    model: LanguageModel, library: MaskLibrary, spec: PosteriorSpec, progress: Progress | None = None
) -> dict[str, Any]:
    """Sample replies from one mask, read each back, and count the switches found (zero expected)."""
    control = spec.negative_control
    assert control is not None
    require(model, "sample", "the posterior's negative control")
    mask = library.get(control.mask)
    params = SampleParams(control.max_new_tokens, control.temperature, 1.0, control.seed)
    ctx = mask.conversation([Turn(role="user", content=control.user)])
    replies = []
    for sample in sorted(model.sample_indices(ctx, range(control.samples), params), key=lambda x: x.index):
        if not sample.text.strip():
            continue
        read = mask_posterior(model, library, sample.text, user=control.user, switch_rate=spec.switch_rate)
        speakers = [library.names[i] for i in np.argmax(read.smoothed, axis=1)]
        replies.append(
            {
                "index": sample.index,
                "text": sample.text,
                "tokens": len(read.tokens),
                "switches_viterbi": len(read.switches("viterbi")),
                "switches_smoothed": len(read.switches("smoothed")),
                "speaker": max(library.names, key=speakers.count),  # ties: the first in the library
                "final_static_top": library.names[int(np.argmax(read.static[-1]))],
            }
        )
    if not replies:
        raise UserError("every negative-control reply was empty; raise its max_new_tokens")
    return {
        "mask": control.mask,
        "user": control.user,
        "expected": "no switch",
        "replies": replies,
        "with_switch": share_ci([r["switches_viterbi"] > 0 for r in replies], unit="replies"),
        "read_as_the_sampling_mask": share_ci(
            [r["speaker"] == control.mask for r in replies], unit="replies"
        ),
    }


def write_csv(summary: dict[str, Any], path: Path) -> Path:
    """The per-token table as CSV."""
    rows = summary["tokens"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
