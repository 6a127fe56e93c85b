"""The `character` experiment: under pressure, does the model step out of the mask it was given?

For every persona x pressure cell:
- exact: the probability that the reply begins with one of the target strings (teacher forcing);
- exact: the top-k distribution of the reply's first token;
- sampled: the rates of "target", "in character" and "other" replies, with Wilson 95% intervals;
- a sampling check (at temperature 1, top-p 1): the sampled count of replies beginning with the target tokens
  tested against the exact probability (two-sided exact binomial test), with Holm's correction over all cells,
  so that a run of 30 cells does not flag about 1.5 of them by chance;
- a few example replies;
- contrasts: each persona against the plain assistant (the baseline persona) and against its own control
  pressures, paired over the same pressures;
- a mask-adoption check: how often each persona's replies to a neutral question carry that persona's own
  markers, against how often the baseline's replies to the same question carry them (a negative control).

On a model that cannot score (a chat-only hosted endpoint: no echo, no prompt log-probabilities), the exact
numbers are left out and said to be; the first token's top log-probabilities as the server reports them stand
in for them, where a target outside the returned top-k gets an upper bound, never a number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope.experiments.spec import RunSpec
from maskscope.models.base import (
    Conversation,
    LanguageModel,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
    require,
)
from maskscope.progress import Progress, Silent
from maskscope.stats import binomial_two_sided, holm, paired_diff, share_ci, share_diff_ci

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
    markers: list[str] = Field(
        default_factory=list,
        description="Regular expressions (case-insensitive) that mark a reply in this persona's character, for "
        "the mask-adoption check. Empty: the spec's shared `in_character` markers.",
    )

    @field_validator("markers")
    @classmethod
    def _valid_markers(cls, patterns: list[str]) -> list[str]:
        return _compiled_ok(patterns)

    @model_validator(mode="after")
    def _one_conditioning(self) -> Persona:
        if self.system is not None and self.preamble is not None:
            raise ValueError("give a persona either a system prompt or a preamble, not both")
        return self


def _compiled_ok(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad regular expression {p!r}: {e}") from e
    return patterns


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
    baseline: str | None = Field(
        None,
        description="The persona every other is contrasted against (the plain assistant). None: the one "
        "persona marked control, if there is exactly one.",
    )
    neutral: str | None = Field(
        None,
        description="The pressure that asks nothing of the mask (e.g. an unrelated question), for the "
        "mask-adoption check. None: no adoption check.",
    )

    def limited(self, n: int) -> CharacterSpec:
        """`--limit N`: the first N pressures (user turns), under every persona; a `neutral` pressure the
        spec names is kept as well, wherever it is (the mask-adoption check reads it)."""
        neutral = getattr(self, "neutral", None)
        kept = [p.model_dump() for i, p in enumerate(self.pressures) if i < n or p.name == neutral]
        return self._replaced(pressures=kept)  # type: ignore[return-value]

    @field_validator("in_character")
    @classmethod
    def _valid_regexes(cls, patterns: list[str]) -> list[str]:
        return _compiled_ok(patterns)

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
        if self.baseline is not None and self.baseline not in [p.name for p in self.personas]:
            raise ValueError(f"baseline {self.baseline!r} is not one of the personas")
        if self.neutral is not None and self.neutral not in [q.name for q in self.pressures]:
            raise ValueError(f"neutral {self.neutral!r} is not one of the pressures")
        return self

    def baseline_persona(self) -> str | None:
        """The persona the others are contrasted against: `baseline`, else the only control persona."""
        if self.baseline is not None:
            return self.baseline
        controls = [p.name for p in self.personas if p.control]
        return controls[0] if len(controls) == 1 else None


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


def first_token_targets(dist: TokenDist, targets: Sequence[str]) -> dict[str, Any]:
    """What a server's top-k log-probabilities of the reply's first token say about the event "the first
    token's text is one of the targets". A target among the returned tokens gets the probability reported for
    it; a target outside them gets only an upper bound: a token not returned is no more probable than the last
    one returned, nor than the mass the returned ones leave. The union (distinct tokens are disjoint events) is
    a number when every target was returned, else an interval [sum of the returned ones, that plus the most
    the others can hold]."""
    probs: dict[str, float] = {}
    for token, p in dist.as_pairs():
        probs[token] = probs.get(token, 0.0) + p  # two ids can share a text
    returned = sum(probs.values())
    left = max(0.0, 1.0 - returned)
    cap = min(min(probs.values()) if probs else 1.0, left)
    per_target = []
    absent = 0
    low = 0.0
    for t in dict.fromkeys(targets):
        if t in probs:
            per_target.append({"target": t, "kind": "reported", "p": probs[t]})
            low += probs[t]
        else:
            absent += 1
            per_target.append({"target": t, "kind": "bound", "p": None, "at_most": cap})
    high = min(1.0, low + min(left, absent * cap))
    union: dict[str, Any] = (
        {"kind": "reported", "p": low}
        if absent == 0
        else {"kind": "bounds", "p": None, "at_least": low, "at_most": high}
    )
    return {"per_target": per_target, "union": union, "returned": len(probs), "returned_mass": returned}


def matches(texts: Sequence[str], markers: Sequence[re.Pattern[str]]) -> list[bool]:
    """For each reply, whether any of the markers matches it anywhere."""
    return [any(m.search(t) for m in markers) for t in texts]


def adoption(
    persona_texts: Sequence[str], baseline_texts: Sequence[str], patterns: Sequence[str], own: bool
) -> dict[str, Any]:
    """The mask-adoption check of one persona under the neutral question: the share of its replies that carry
    its markers, the share of the baseline's replies to the same question that carry them (the negative
    control: the markers' rate without the mask), their difference with an interval, and a verdict: "worn"
    when the interval of the difference lies above 0, else "not shown"."""
    markers = [re.compile(p, re.IGNORECASE) for p in patterns]
    mine = share_ci(matches(persona_texts, markers), unit="replies")
    base = share_ci(matches(baseline_texts, markers), unit="replies")
    diff = share_diff_ci(mine["k"], mine["n"], base["k"], base["n"])
    verdict = "worn" if diff["diff"] is not None and diff["ci95"][0] > 0 else "not shown"
    return {
        "markers": list(patterns),
        "markers_kind": "own" if own else "shared",
        "in_character": mine,
        "baseline_in_character": base,
        "difference": diff,
        "verdict": verdict,
    }


def _target_share(cell: dict[str, Any]) -> tuple[int, int]:
    t = cell["sampled"]["categories"]["target"]
    return int(t["k"]), int(t["n"])


def _exact(cell: dict[str, Any]) -> float | None:
    return None if cell["exact"] is None else float(cell["exact"]["p_target"])


def contrasts(spec: CharacterSpec, out_cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each persona against the baseline persona, and against its own control pressures.

    Per pressure: the difference of the exact P(target) (exact, no interval needed) and of the sampled target
    shares (independent samples: Newcombe's interval). Over the pressures that are not controls: the mean
    difference, paired by pressure (bootstrap over the pressures, Wilcoxon signed-rank test)."""
    cells = {(c["persona"], c["pressure"]): c for c in out_cells}
    pressures = [q.name for q in spec.pressures if not q.control]
    controls = [q.name for q in spec.pressures if q.control]
    baseline = spec.baseline_persona()
    sampled = bool(spec.samples)

    def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]], names: list[str]) -> dict[str, Any]:
        rows = []
        for name, (a, b) in zip(names, pairs, strict=True):
            ea, eb = _exact(a), _exact(b)
            row: dict[str, Any] = {
                "pressure": name,
                "exact_diff": None if ea is None or eb is None else ea - eb,
            }
            if sampled:
                row["sampled_diff"] = share_diff_ci(*_target_share(a), *_target_share(b))
            rows.append(row)
        out: dict[str, Any] = {"per_pressure": rows, "exact_mean": None, "sampled_mean": None}
        if (
            pairs
            and all(_exact(a) is not None for a, _ in pairs)
            and all(_exact(b) is not None for _, b in pairs)
        ):
            out["exact_mean"] = paired_diff(
                [_exact(a) for a, _ in pairs], [_exact(b) for _, b in pairs], unit="pressures"
            )
        if pairs and sampled:
            rate = [_target_share(a)[0] / max(1, _target_share(a)[1]) for a, _ in pairs]
            base = [_target_share(b)[0] / max(1, _target_share(b)[1]) for _, b in pairs]
            out["sampled_mean"] = paired_diff(rate, base, unit="pressures")
        return out

    personas = []
    for p in spec.personas:
        if p.name == baseline:
            continue
        entry: dict[str, Any] = {
            "persona": p.name,
            "control": p.control,
            "vs_baseline": None,
            "vs_controls": [],
        }
        if baseline is not None:
            entry["vs_baseline"] = compare(
                [(cells[(p.name, q)], cells[(baseline, q)]) for q in pressures], pressures
            )
        for c in controls:
            entry["vs_controls"].append(
                {
                    "control": c,
                    **compare([(cells[(p.name, q)], cells[(p.name, c)]) for q in pressures], pressures),
                }
            )
        personas.append(entry)
    return {"baseline": baseline, "pressures": pressures, "controls": controls, "personas": personas}


def run(model: LanguageModel, spec: CharacterSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment on a model (usually a store-backed CachedModel); return the summary as a dict.

    A model that cannot score (a chat-only server) gets no exact numbers, and the summary says so: its
    cells carry the server's first-token top-k with bounds (`first_token`) and the sampled shares."""
    progress = progress or Silent()
    exact = "score" in model.capabilities
    if not exact and not spec.samples and "next_token_distribution" not in model.capabilities:
        require(model, "score", "the character experiment (with no samples and no first-token distribution)")
    if exact:
        require(model, "score", "the character experiment")
    if spec.samples:
        require(model, "sample", "the character experiment (samples > 0)")
    cells = [(p, q) for p in spec.personas for q in spec.pressures]
    contexts = [cell_context(p, q) for p, q in cells]

    scores: list[list[Scored | None]] = [[None] * len(spec.targets) for _ in cells]
    if exact:
        advance = progress.task("exact: target probabilities", len(cells))
        seen: set[int] = set()
        for c, j, s in model.score_many([(ctx, spec.targets) for ctx in contexts]):
            scores[c][j] = s
            if all(x is not None for x in scores[c]) and c not in seen:
                seen.add(c)
                advance(1)

    dists: list[Any] = [None] * len(cells)
    if "next_token_distribution" in model.capabilities:
        kind = "exact" if exact else "reported"
        advance = progress.task(f"{kind}: first-token distributions", len(cells))
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
        cell_samples = sorted(samples[c], key=lambda s: s.index)
        samples[c] = cell_samples
        labels = [classify(s, spec.targets, markers) for s in cell_samples]
        n = len(cell_samples)
        rates = {cat: share_ci([lab == cat for lab in labels], unit="replies") for cat in CATEGORIES}
        top_k = None if dists[c] is None else [{"token": t, "p": p} for t, p in dists[c].as_pairs()]
        cell_exact: dict[str, Any] | None = None
        begins: dict[str, Any] | None = None
        first_token: dict[str, Any] | None = None
        if exact:
            cell_scores = [s for s in scores[c] if s is not None]
            p_target, counted = union_probability(cell_scores)
            target_tokens = [s.token_ids for s in cell_scores]
            begins = share_ci(
                [begins_with_target_tokens(s, target_tokens) for s in cell_samples], unit="replies"
            )
            cell_exact = {
                "p_target": p_target,
                "targets_counted": counted,
                "per_target": [
                    {"target": s.continuation, "tokens": s.tokens, "logprob": s.total, "p": s.prob}
                    for s in cell_scores
                ],
                "first_token_top_k": top_k,
            }
        elif dists[c] is not None:
            first_token = {
                "top_k": top_k,
                "complete": dists[c].complete,
                **first_token_targets(dists[c], spec.targets),
            }
        out_cells.append(
            {
                "persona": persona.name,
                "pressure": pressure.name,
                "prompt": model.render(contexts[c]),
                "exact": cell_exact,
                **({} if exact else {"first_token": first_token}),
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
    check_applies = exact and bool(spec.samples) and spec.temperature == 1 and spec.top_p == 1
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
            (c["sampled"]["begins_with_target_tokens"] or {}).get("check", {}).get("flagged", False)
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
        "exactness": exactness(exact, dists[0] is not None if dists else False, bool(spec.samples)),
        "personas": [p.model_dump() for p in spec.personas],
        "pressures": [q.model_dump() for q in spec.pressures],
        "cells": out_cells,
        "sampling_check": sampling,
        "contrasts": contrasts(spec, out_cells),
        "adoption": adoption_check(spec, cells, samples),
    }


def adoption_check(
    spec: CharacterSpec, cells: Sequence[tuple[Persona, Pressure]], samples: Sequence[Sequence[Sample]]
) -> dict[str, Any]:
    """The mask-adoption check of every persona but the baseline under the neutral pressure (see `adoption`);
    {"applies": False, "why": ...} when the spec names no neutral pressure, no baseline, or draws no samples."""
    baseline = spec.baseline_persona()
    why = None
    if spec.neutral is None:
        why = "the spec names no neutral pressure (`neutral`)"
    elif baseline is None:
        why = "no baseline persona (`baseline`, or exactly one persona marked control)"
    elif not spec.samples:
        why = "no samples are drawn"
    if why is not None:
        return {"applies": False, "why": why, "personas": []}
    texts = {(p.name, q.name): [s.text for s in ss] for (p, q), ss in zip(cells, samples, strict=True)}
    base_texts = texts[(baseline, spec.neutral)]
    out = []
    for p in spec.personas:
        if p.name == baseline:
            continue
        patterns = p.markers or spec.in_character
        if not patterns:
            out.append({"persona": p.name, "verdict": "no markers", "markers": []})
            continue
        out.append(
            {
                "persona": p.name,
                **adoption(texts[(p.name, spec.neutral)], base_texts, patterns, bool(p.markers)),
            }
        )
    return {"applies": True, "neutral": spec.neutral, "baseline": baseline, "personas": out}


def exactness(exact: bool, first_token: bool, sampled: bool) -> list[dict[str, str]]:
    """Which parts of the summary are exact, which are reported by a server, sampled or bounds, and which are
    missing, with the reason: the report prints this table."""
    rows = [
        {
            "part": "P(reply begins with a target)",
            "kind": "exact" if exact else "not available",
            "how": "teacher-forced log-probabilities of each target after the prompt"
            if exact
            else "the model gives no prompt log-probabilities (no echo, no prompt_logprobs): nothing is scored",
        }
    ]
    if first_token:
        rows.append(
            {
                "part": "first token's top-k",
                "kind": "exact" if exact else "reported; bounds outside the top-k",
                "how": "the model's next-token distribution"
                if exact
                else "the server's top log-probabilities of the first generated token; a target outside the "
                "returned top-k gets an upper bound, never a number",
            }
        )
    if sampled:
        rows.append(
            {
                "part": "reply categories, contrasts of sampled shares, mask adoption",
                "kind": "sampled",
                "how": "shares of sampled replies with Wilson 95% intervals; differences with Newcombe's interval",
            }
        )
    if exact:
        rows.append(
            {
                "part": "contrasts of P(target)",
                "kind": "exact",
                "how": "differences of exact probabilities; their mean over pressures has a bootstrap interval "
                "over the pressures (the pressures are the sample)",
            }
        )
    return rows


DEFINITIONS = {
    "contrasts": (
        "Each persona against the baseline persona (the plain assistant) under the same pressure, and against "
        "its own control pressures. Exact differences of P(target) where the model can score; differences of "
        "sampled target shares with Newcombe's 95% interval (independent samples); the mean difference over the "
        "pressures that are not controls is paired by pressure (percentile bootstrap over the pressures, "
        "Wilcoxon signed-rank test)."
    ),
    "adoption": (
        "Sampled. Under the neutral pressure, the share of a persona's replies that match its markers "
        "(case-insensitive regular expressions: the persona's own `markers`, else the spec's shared "
        "`in_character` list), against the share of the baseline's replies to the same question that match "
        "them (negative control). 'worn': the 95% interval of the difference lies above 0; 'not shown': it "
        "does not, and the persona's contrasts say little about the mask."
    ),
    "first_token": (
        "Reported by the server, not computed: the top log-probabilities of the reply's first token. The event "
        "is 'the first token's text is a target'. A target among the returned tokens gets the probability "
        "reported for it; a target outside them gets an upper bound (at most the last returned token's "
        "probability and at most the mass left by the returned ones), never a number."
    ),
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
