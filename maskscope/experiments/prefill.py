"""The `prefill` experiment: what does the model say after being forced to begin with a given text?

The assistant's turn is forced to begin with a prefill, for example a wrong answer to an arithmetic question
("The answer is 12." when it is 10). For each prefill x problem:

- exact: the probability that the reply goes on with each given continuation (self-correction markers such as
  " Wait", " Sorry", " Actually", " Correction"), the probability that it goes on with at least one of them
  (the union, counting nested markers once) and the probability that it ends right there;
- sampled: continuations at temperature 1, sorted into categories (ends, states the right answer, a
  self-correction marker, other); several continuations belong to one problem, so their intervals are a
  cluster bootstrap over problems.

The prefill with the right answer is the control: markers after it measure how often the model "corrects"
an answer that needed no correction. Every prefill is compared with the control on the same problems (a paired
design): the mean per-problem difference with a bootstrap interval over problems and a Wilcoxon signed-rank test.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope.experiments.character import union_probability
from maskscope.experiments.spec import RunSpec, check_regex
from maskscope.masks import Mask
from maskscope.models.base import Capability, ContinueJob, Scored, require
from maskscope.progress import Progress, Silent
from maskscope.reasoning.metrics import mean_ci
from maskscope.stats import cluster_share_ci, paired_diff
from maskscope.tasks import Problem, TaskSpec, load_tasks, turns, wrong_answer

CATEGORIES = ("ends", "states_right", "self_correction", "other")
MARKERS = [
    " Wait",
    " Sorry",
    " Actually",
    " Correction",
    " Oops",
    " I apologize",
    " I made a mistake",
    " No,",
    "\n\nWait",
    "\n\nSorry",
    "\n\nActually",
    "\n\nCorrection",
    "\n\nI apologize",
    "\n\nNo,",
]
MARKER_WORDS = r"\b(wait|sorry|actually|correction|oops|apologi[sz]e|mistake|incorrect|wrong)\b"


class Prefill(BaseModel):
    """Text the assistant's turn is forced to begin with; {answer} is the right answer, {wrong} a wrong one."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short label used in tables and plots.")
    text: str = Field(min_length=1, description="The forced beginning of the reply.")
    control: bool = Field(False, description="Marks a control (e.g. the right answer).")

    @field_validator("text")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        unknown = set(re.findall(r"\{(\w*)\}", v)) - {"answer", "wrong"}
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(sorted(unknown))}: use {{answer}} or {{wrong}}"
            )
        return v


class PrefillSpec(RunSpec):
    """Forced beginnings x task problems: exact probabilities of given continuations, sampled categories."""

    experiment: Literal["prefill"] = "prefill"
    tasks: list[TaskSpec] = Field(min_length=1, description="The task sets (generators or JSONL files).")
    mask: Mask = Field(
        default_factory=lambda: Mask(name="plain-assistant"), description="Who answers (default: no mask)."
    )
    style: Literal["cot", "direct"] = Field(
        "direct",
        description="How the question is asked (and the worked examples answered) before the prefill.",
    )
    prefills: list[Prefill] = Field(
        default_factory=lambda: [
            Prefill(name="wrong", text="The answer is {wrong}."),
            Prefill(name="right", text="The answer is {answer}.", control=True),
        ],
        min_length=1,
        description="The forced beginnings.",
    )
    markers: list[str] = Field(
        default_factory=lambda: list(MARKERS),
        min_length=1,
        description="Continuations whose exact probability is computed (self-correction markers).",
    )
    marker_pattern: str = Field(
        MARKER_WORDS,
        description="Regular expression (case-insensitive) that marks a sampled self-correction.",
    )
    samples: int = Field(20, ge=0, le=100_000, description="Sampled continuations per prefill x problem.")
    max_new_tokens: int = Field(30, ge=1, le=4096, description="Length limit of each sampled continuation.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (the exact numbers are at 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Seed of sampling, of the wrong answers and of the bootstrap.")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples of each interval.")
    max_rows: int = Field(32, ge=1, le=1024, description="Rows per batch (memory: rows x sequence length).")
    examples: int = Field(4, ge=0, le=100, description="Example continuations shown per prefill.")

    def limited(self, n: int) -> PrefillSpec:
        """`--limit N`: the first N problems of each task set (a generator's first N, a file's first N)."""
        tasks = [{**t.model_dump(), "n": min(t.n, n)} for t in self.tasks]
        return self._replaced(tasks=tasks)  # type: ignore[return-value]

    @field_validator("markers")
    @classmethod
    def _nonempty_markers(cls, v: list[str]) -> list[str]:
        if any(not m for m in v):
            raise ValueError("markers must be non-empty strings")
        return v

    @field_validator("marker_pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        return check_regex(v)

    @model_validator(mode="after")
    def _unique(self) -> PrefillSpec:
        names = [p.name for p in self.prefills]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"prefill names must be unique; repeated: {', '.join(dup)}")
        return self


def fill(template: str, problem: Problem, wrong: str) -> str:
    """The prefill text for a problem: {answer} and {wrong} replaced."""
    return template.replace("{answer}", problem.answer).replace("{wrong}", wrong)


def categorize(text: str, problem: Problem, pattern: re.Pattern[str]) -> str:
    """ "ends" if nothing follows; "states_right" if the right answer appears as a whole word; else
    "self_correction" if a marker matches; else "other"."""
    if not text.strip():
        return "ends"
    if re.search(rf"(?<![\w.]){re.escape(problem.answer)}(?![\w]|\.\d)", text, re.IGNORECASE):
        return "states_right"
    if pattern.search(text):
        return "self_correction"
    return "other"


def run(model: Any, spec: PrefillSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment on a model (usually a store-backed CachedModel); return the summary as a dict."""
    progress = progress or Silent()
    require(model, Capability.CUTS, "the prefill experiment")
    pattern = re.compile(spec.marker_pattern, re.IGNORECASE)
    problems = [(ts, p) for ts in load_tasks(spec.tasks) for p in ts.problems]
    wrongs = [wrong_answer(p, random.Random(f"{spec.seed}:{p.id}")) for _, p in problems]
    cells = [(q, k) for q in spec.prefills for k in range(len(problems))]
    contexts = []
    for q, k in cells:
        ts, p = problems[k]
        contexts.append(
            spec.mask.conversation(turns(p, ts.exemplars, style=spec.style), fill(q.text, p, wrongs[k]))
        )

    ends = model.end_tokens()
    asked = [*spec.markers, *ends]
    advance = progress.task("exact: continuation probabilities", len(cells))
    scores: list[list[Scored | None]] = [[None] * len(asked) for _ in cells]
    for c, j, s in model.score_many([(ctx, asked) for ctx in contexts]):
        scores[c][j] = s
        if all(x is not None for x in scores[c]):
            advance(1)
    p_end = [sum(s.prob for s in row[len(spec.markers) :] if s is not None) for row in scores]

    seqs = [model.sequence(ctx) for ctx in contexts]
    conts = [
        ContinueJob(seq, len(seq.ids), spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed, i)
        for seq in seqs
        for i in range(spec.samples)
    ]
    what = "sampled continuations" if spec.temperature > 0 else "greedy continuations"
    results = model.continued(conts, progress.task(what, len(conts)), spec.max_rows)

    ci = {"seed": spec.seed, "resamples": spec.bootstrap}
    by_prefill: dict[str, Any] = {}
    per_problem: dict[str, dict[str, list[float]]] = {}
    for q in spec.prefills:
        idx = [c for c, (qq, _) in enumerate(cells) if qq is q]
        union, per_marker = [], {m: [] for m in spec.markers}
        labels: list[str] = []
        groups: list[list[str]] = []
        examples = []
        for c in idx:
            cell_scores = [s for s in scores[c][: len(spec.markers)] if s is not None]
            union.append(union_probability(cell_scores)[0])
            for s in cell_scores:
                per_marker[s.continuation].append(s.prob)
            k = cells[c][1]
            p = problems[k][1]
            groups.append([])
            for r in results[c * spec.samples : (c + 1) * spec.samples]:
                labels.append(categorize(r["text"], p, pattern))
                groups[-1].append(labels[-1])
                if len(examples) < spec.examples:
                    examples.append(
                        {
                            "question": p.question,
                            "answer": p.answer,
                            "prefill": fill(q.text, p, wrongs[k]),
                            "continuation": r["text"],
                            "category": labels[-1],
                        }
                    )
        by_prefill[q.name] = {
            "exact": {
                "p_marker": mean_ci(union, **ci, unit="problems"),
                "p_end": mean_ci([p_end[c] for c in idx], **ci, unit="problems"),
                "per_marker": {m: mean_ci(v, **ci, unit="problems") for m, v in per_marker.items()},
            },
            "sampled": {
                "n": len(labels),
                "categories": {
                    cat: cluster_share_ci([[lab == cat for lab in g] for g in groups], **ci)
                    for cat in CATEGORIES
                },
            },
            "examples": examples,
        }
        per_problem[q.name] = {
            "p_marker": union,
            "p_end": [p_end[c] for c in idx],
            **{
                cat: [sum(lab == cat for lab in g) / len(g) for g in groups]
                for cat in CATEGORIES
                if spec.samples
            },
        }
    control = next((q.name for q in spec.prefills if q.control), None)
    paired: dict[str, Any] = {}
    if control is not None:
        for q in spec.prefills:
            if q.name == control:
                continue
            paired[q.name] = {
                metric: paired_diff(values, per_problem[control][metric], **ci)
                for metric, values in per_problem[q.name].items()
            }
    return {
        "experiment": "prefill",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "definitions": DEFINITIONS,
        "prefills": [q.model_dump() for q in spec.prefills],
        "categories": list(CATEGORIES),
        "n_problems": len(problems),
        "by_prefill": by_prefill,
        "control": control,
        "minus_control": paired,
    }


DEFINITIONS = {
    "p_marker": (
        "Exact. Probability that the reply, right after the prefill, goes on with at least one of the markers "
        "(each tokenized as the tokenizer splits it after the prefill; a marker whose tokens extend another's "
        "is contained in it and counted once). Mean over problems, 95% bootstrap interval over problems."
    ),
    "p_end": "Exact. Probability that the next token ends the reply (end of sequence). Mean over problems.",
    "sampling check": (
        "At temperature 1 the sampled share of 'ends' estimates the mean exact p_end: the two should agree "
        "within the interval."
    ),
    "minus_control": (
        "Paired, on the same problems: per problem, this prefill's number minus the control prefill's (exact "
        "probabilities, or the share of a problem's sampled continuations in a category); mean with a "
        "percentile bootstrap interval over problems and the Wilcoxon signed-rank p-value."
    ),
    "categories": (
        "Sampled; several continuations per problem, so the 95% interval is a cluster bootstrap over problems "
        "(each problem resampled with all its continuations; Wilson when there is one per problem). 'ends': "
        "nothing follows; 'states_right': the "
        "right answer appears as a whole word; 'self_correction': otherwise, a marker word (wait, sorry, "
        "actually, correction, oops, apologize, mistake, incorrect, wrong) appears; 'other': none of these."
    ),
}
