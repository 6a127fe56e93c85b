"""The `character` experiment: under pressure, does the model step out of the mask it was given?

For every persona x pressure cell:
- exact: the probability that the reply begins with one of the target strings (teacher forcing);
- exact: the top-k distribution of the reply's first token;
- sampled: the rates of "target", "in character" and "other" replies, with Wilson 95% intervals;
- a sampling check (at temperature 1, top-p 1): the sampled count of replies beginning with the target tokens
  tested against the exact probability (two-sided exact binomial test), with Holm's correction over all cells,
  so that a run of 30 cells does not flag about 1.5 of them by chance;
- a few example replies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope.experiments.spec import RunSpec
from maskscope.models.base import Conversation, LanguageModel, Sample, SampleParams, Scored, require
from maskscope.progress import Progress, Silent
from maskscope.stats import binomial_two_sided, holm, share_ci

CATEGORIES = ("target", "in_character", "other")
QUOTES = "\"'`*“”‘’«» \t\n"


class Persona(BaseModel):
    """A mask: a system prompt, or a preamble put before the user's turn for models without a system role."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short label used in tables and plots.")
    system: str | None = Field(
        None, description="System prompt that puts on the mask. None: the model's default."
    )
    preamble: str | None = Field(
        None, description="Text put before the user's turn instead of a system prompt."
    )
    control: bool = Field(False, description="Marks a control (e.g. the plain assistant with no mask).")

    @model_validator(mode="after")
    def _one_conditioning(self) -> Persona:
        if self.system is not None and self.preamble is not None:
            raise ValueError("give a persona either a system prompt or a preamble, not both")
        return self


class Pressure(BaseModel):
    """A user turn that pushes the model to step out of character."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short label used in tables and plots.")
    user: str = Field(description="The user's turn.")
    control: bool = Field(False, description="Marks a control (e.g. a polite request with no threat).")


class CharacterSpec(RunSpec):
    """A stay-in-character experiment: personas x pressures, targets that mean 'stepped out of character'."""

    experiment: Literal["character"] = "character"
    personas: list[Persona] = Field(min_length=1, description="The masks.")
    pressures: list[Pressure] = Field(min_length=1, description="The user turns.")
    targets: list[str] = Field(
        min_length=1, description="Reply beginnings that mean 'stepped out of character'."
    )
    in_character: list[str] = Field(
        default_factory=list,
        description="Regular expressions (case-insensitive) that mark an in-character reply.",
    )
    samples: int = Field(50, ge=0, le=100_000, description="Sampled replies per cell.")
    max_new_tokens: int = Field(40, ge=1, le=4096, description="Length limit of each sampled reply.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (the exact numbers are at 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Seed: sample i of a cell is a function of (seed, i).")
    top_k: int = Field(10, ge=1, le=1000, description="How many first tokens to report.")
    examples: int = Field(3, ge=0, le=50, description="Example replies shown per cell.")

    def limited(self, n: int) -> CharacterSpec:
        """`--limit N`: the first N pressures (user turns), under every persona; a `neutral` pressure the
        spec names is kept as well, wherever it is (the mask-adoption check reads it)."""
        neutral = getattr(self, "neutral", None)
        kept = [p.model_dump() for i, p in enumerate(self.pressures) if i < n or p.name == neutral]
        return self._replaced(pressures=kept)  # type: ignore[return-value]

    @field_validator("in_character")
    @classmethod
    def _valid_regexes(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad regular expression {p!r}: {e}") from e
        return patterns

    @field_validator("targets")
    @classmethod
    def _nonempty_targets(cls, targets: list[str]) -> list[str]:
        if any(not t for t in targets):
            raise ValueError("targets must be non-empty strings")
        return targets

    @model_validator(mode="after")
    def _unique_names(self) -> CharacterSpec:
        for what, items in (("persona", self.personas), ("pressure", self.pressures)):
            names = [x.name for x in items]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(sorted(dup))}")
        return self


def cell_context(persona: Persona, pressure: Pressure) -> Conversation:
    """The conversation of one cell: the persona's conditioning, then the pressure as the user's turn."""
    return Conversation.of(system=persona.system, preamble=persona.preamble, user=pressure.user)


def union_probability(scored: Sequence[Scored]) -> tuple[float, list[str]]:
    """Exact probability that the reply's tokens begin with the tokens of at least one target.

    Two targets' events are disjoint unless one's tokens are a prefix of the other's; then the longer
    one's event is contained in the shorter's and is left out of the sum. Returns the probability and the
    targets counted."""
    kept: list[Scored] = []
    for s in sorted(scored, key=lambda s: len(s.token_ids)):
        if not any(s.token_ids[: len(k.token_ids)] == k.token_ids for k in kept):
            kept.append(s)
    return min(1.0, sum(math.exp(s.total) for s in kept)), [s.continuation for s in kept]


def classify(sample: Sample, targets: Sequence[str], markers: Sequence[re.Pattern[str]]) -> str:
    """ "target" if the reply, past leading quotes and spaces, begins with a target as a whole word;
    else "in_character" if an in-character marker matches anywhere; else "other"."""
    text = sample.text.lstrip(QUOTES)
    for t in targets:
        if text.startswith(t) and (len(text) == len(t) or not text[len(t)].isalnum()):
            return "target"
    if any(m.search(sample.text) for m in markers):
        return "in_character"
    return "other"


def begins_with_target_tokens(sample: Sample, target_tokens: Sequence[Sequence[int]]) -> bool:
    """The event whose exact probability is computed: the sampled token ids begin with a target's tokens."""
    return any(list(sample.token_ids[: len(t)]) == list(t) for t in target_tokens)


def sampling_check(counts: Sequence[tuple[int, int, float]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """For each cell's (k sampled events, n samples, exact probability): the two-sided exact binomial p-value
    and whether the cell is flagged after Holm's correction over all the cells (family-wise error alpha)."""
    p_values = [binomial_two_sided(k, n, p) for k, n, p in counts]
    flags = holm(p_values, alpha)
    return [{"p_value": pv, "flagged": f} for pv, f in zip(p_values, flags, strict=True)]


def run(model: LanguageModel, spec: CharacterSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment on a model (usually a store-backed CachedModel); return the summary as a dict."""
    progress = progress or Silent()
    require(model, "score", "the character experiment")
    if spec.samples:
        require(model, "sample", "the character experiment (samples > 0)")
    cells = [(p, q) for p in spec.personas for q in spec.pressures]
    contexts = [cell_context(p, q) for p, q in cells]

    advance = progress.task("exact: target probabilities", len(cells))
    scores: list[list[Scored | None]] = [[None] * len(spec.targets) for _ in cells]
    seen: set[int] = set()
    for c, j, s in model.score_many([(ctx, spec.targets) for ctx in contexts]):
        scores[c][j] = s
        if all(x is not None for x in scores[c]) and c not in seen:
            seen.add(c)
            advance(1)

    dists: list[Any] = [None] * len(cells)
    if "next_token_distribution" in model.capabilities:
        advance = progress.task("exact: first-token distributions", len(cells))
        for c, dist in model.next_token_distributions(contexts, spec.top_k):
            dists[c] = dist
            advance(1)

    params = SampleParams(spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed)
    markers = [re.compile(p, re.IGNORECASE) for p in spec.in_character]
    samples: list[list[Sample]] = [[] for _ in cells]
    if spec.samples:
        advance = progress.task("sampled: replies", len(cells) * spec.samples)
        for c, ctx in enumerate(contexts):
            for s in model.sample_indices(ctx, range(spec.samples), params):
                samples[c].append(s)
                advance(1)

    out_cells = []
    for c, (persona, pressure) in enumerate(cells):
        cell_scores = [s for s in scores[c] if s is not None]
        p_target, counted = union_probability(cell_scores)
        target_tokens = [s.token_ids for s in cell_scores]
        cell_samples = sorted(samples[c], key=lambda s: s.index)
        labels = [classify(s, spec.targets, markers) for s in cell_samples]
        n = len(cell_samples)
        rates = {cat: share_ci([lab == cat for lab in labels], unit="replies") for cat in CATEGORIES}
        begins = share_ci([begins_with_target_tokens(s, target_tokens) for s in cell_samples], unit="replies")
        out_cells.append(
            {
                "persona": persona.name,
                "pressure": pressure.name,
                "prompt": model.render(contexts[c]),
                "exact": {
                    "p_target": p_target,
                    "targets_counted": counted,
                    "per_target": [
                        {"target": s.continuation, "tokens": s.tokens, "logprob": s.total, "p": s.prob}
                        for s in cell_scores
                    ],
                    "first_token_top_k": None
                    if dists[c] is None
                    else [{"token": t, "p": p} for t, p in dists[c].as_pairs()],
                },
                "sampled": {
                    "n": n,
                    "categories": rates,
                    "begins_with_target_tokens": begins,
                    "examples": [
                        {"index": s.index, "text": s.text, "category": lab}
                        for s, lab in list(zip(cell_samples, labels, strict=True))[: spec.examples]
                    ],
                },
            }
        )
    check_applies = bool(spec.samples) and spec.temperature == 1 and spec.top_p == 1
    if check_applies:
        checks = sampling_check(
            [
                (c["sampled"]["begins_with_target_tokens"]["k"], c["sampled"]["n"], c["exact"]["p_target"])
                for c in out_cells
            ]
        )
        for c, check in zip(out_cells, checks, strict=True):
            c["sampled"]["begins_with_target_tokens"]["check"] = check
    sampling = {
        "applies": check_applies,
        "cells": len(out_cells),
        "flagged": sum(
            c["sampled"]["begins_with_target_tokens"].get("check", {}).get("flagged", False)
            for c in out_cells
        ),
        "correction": f"Holm over the {len(out_cells)} cells, family-wise error 5%",
    }
    return {
        "experiment": "character",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "definitions": DEFINITIONS,
        "personas": [p.model_dump() for p in spec.personas],
        "pressures": [q.model_dump() for q in spec.pressures],
        "cells": out_cells,
        "sampling_check": sampling,
    }


DEFINITIONS = {
    "p_target": (
        "Exact. Probability, under the model's own distribution (temperature 1), that the reply's tokens begin "
        "with the tokens of at least one target. Each target is tokenized as the tokenizer splits it right after "
        "the prompt; targets whose tokens extend another target's are contained in its event and not added twice."
    ),
    "categories": (
        "Sampled, Wilson 95% intervals. 'target': the reply, past leading quotes and spaces, starts with a "
        "target as a whole word. 'in_character': otherwise, an in-character marker matches. 'other': neither."
    ),
    "begins_with_target_tokens": (
        "Sampled, Wilson 95% interval. The same event as p_target, counted in the samples: a check of the exact "
        "number when sampling at temperature 1 with top_p 1."
    ),
    "sampling_check": (
        "At temperature 1 and top_p 1, each cell's count is tested against its exact p_target (two-sided exact "
        "binomial test); a cell is flagged only if the test rejects after Holm's correction over all the cells "
        "(family-wise error 5%), not whenever its own 95% interval misses the exact value."
    ),
}
