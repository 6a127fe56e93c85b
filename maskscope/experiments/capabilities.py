"""The `capabilities` experiment: do different masks carry different capabilities?

The same task set is asked under several masks (a system prompt, a preamble or a few-shot dialogue each). For
every mask x problem:

- exact: the reply is forced to begin with "The answer is" after a direct question; the exact probability of
  the right answer (as a whole word), of each candidate where the answer set is small, and the forced answer
  (the most probable candidate, or the greedy number);
- sampled: replies with reasoning (greedy at temperature 0, the default), their answers read and checked.

A mask that answers wrongly on purpose is a negative control: its replies should be wrong, and where the
answer set is small, being wrong more often than any answer that ignores the question would be (the rarest
right answer, given every time) means the model still computes the right answer behind the mask. The plain
assistant (no mask) is the reference the others are compared with, problem by problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from maskscope.experiments.spec import RunSpec
from maskscope.masks import Mask
from maskscope.models.base import Capability, ContinueJob, require
from maskscope.progress import Progress, Silent
from maskscope.reasoning.answers import forced_job, read_forced
from maskscope.reasoning.metrics import mean_ci, rate_ci
from maskscope.reasoning.text import slug
from maskscope.tasks import Problem, TaskSpec, extract_answer, is_correct, load_tasks, turns


class CapabilityMask(Mask):
    """A mask, marked as the control (the plain assistant) or not."""

    control: bool = Field(
        False, description="The reference mask (usually the plain assistant, no system prompt)."
    )


class CapabilitiesSpec(RunSpec):
    """Masks x task sets: exact probabilities of the right answer and sampled accuracy per mask."""

    experiment: Literal["capabilities"] = "capabilities"
    tasks: list[TaskSpec] = Field(min_length=1, description="The task sets (generators or JSONL files).")
    masks: list[CapabilityMask] = Field(min_length=1, description="The masks; at most one is the control.")
    answer_prefix: str = Field("The answer is", min_length=1, description="Forced start of the direct reply.")
    style: Literal["cot", "direct"] = Field(
        "cot", description="Sampled replies: with reasoning, or answer only."
    )
    samples: int = Field(
        1, ge=0, le=10_000, description="Sampled replies per mask x problem (0: exact only)."
    )
    max_new_tokens: int = Field(120, ge=1, le=4096, description="Length limit of each sampled reply.")
    temperature: float = Field(
        0.0, ge=0, description="Sampling temperature (0: greedy, one reply is enough)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (temperature > 0 only).")
    seed: int = Field(
        0, description="Seed: reply i of a cell is a function of (seed, i); also the bootstrap."
    )
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples of each interval.")
    max_rows: int = Field(32, ge=1, le=1024, description="Rows per batch (memory: rows x sequence length).")
    examples: int = Field(3, ge=0, le=100, description="Example replies shown per mask x task.")

    @model_validator(mode="after")
    def _check(self) -> CapabilitiesSpec:
        names = [m.name for m in self.masks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mask names must be unique; repeated: {', '.join(dup)}")
        if sum(m.control for m in self.masks) > 1:
            raise ValueError("at most one mask can be the control")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy replies are all the same)")
        return self


def answer_shares(problems: Sequence[Problem]) -> dict[str, float] | None:
    """Where the answer set is small: the share of problems whose right answer is each choice."""
    first = problems[0]
    if not first.choices:
        return None
    return {c: sum(p.answer == c for p in problems) / len(problems) for c in first.choices}


def reliably_wrong(flags: Sequence[bool], shares: dict[str, float] | None) -> bool:
    """Whether answers are right less often than any rule that ignores the question could manage: the
    Wilson interval's upper end is below the share of the rarest right answer (what giving that answer every
    time scores; 1 / number of choices on a balanced set). A model that always says "True" on a set where
    one third of the answers are True scores one third without being wrong on purpose; it is not counted."""
    if shares is None or not flags:
        return False
    return rate_ci(list(flags))["ci95"][1] < min(shares.values())


def run(model: Any, spec: CapabilitiesSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment on a model (usually a store-backed CachedModel); return the summary as a dict."""
    progress = progress or Silent()
    require(model, Capability.CUTS, "the capabilities experiment")
    task_sets = load_tasks(spec.tasks)
    cells = [(ts, mask, p) for ts in task_sets for mask in spec.masks for p in ts.problems]

    forced = []
    for ts, mask, p in cells:
        seq = model.sequence(mask.conversation(turns(p, ts.exemplars, style="direct")))
        forced.append(forced_job(model, seq, len(seq.ids), spec.answer_prefix, p))
    f_results = model.forced(
        forced, progress.task("exact: forced direct answers", len(forced)), spec.max_rows
    )

    conts, owner = [], []
    for c, (ts, mask, p) in enumerate(cells):
        seq = model.sequence(mask.conversation(turns(p, ts.exemplars, style=spec.style)))
        for i in range(spec.samples):
            conts.append(
                ContinueJob(
                    seq, len(seq.ids), spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed, i
                )
            )
            owner.append(c)
    what = "greedy replies" if spec.temperature == 0 else "sampled replies"
    c_results = model.continued(conts, progress.task(what, len(conts)), spec.max_rows)
    replies: list[list[dict[str, Any]]] = [[] for _ in cells]
    for c, res in zip(owner, c_results, strict=True):
        p = cells[c][2]
        answer, how = extract_answer(res["text"], p)
        replies[c].append(
            {"text": res["text"], "answer": answer, "how": how, "correct": is_correct(answer, p)}
        )

    ci = {"seed": spec.seed, "resamples": spec.bootstrap}
    control = next((m.name for m in spec.masks if m.control), None)
    tasks_out = []
    for ts in task_sets:
        first = ts.problems[0]
        chance = 1 / len(first.choices) if first.choices else None
        shares = answer_shares(ts.problems)
        per_mask: dict[str, dict[str, Any]] = {}
        exact_by_mask: dict[str, list[float]] = {}
        for mask in spec.masks:
            idx = [c for c, (t, m, _) in enumerate(cells) if t is ts and m is mask]
            read = [read_forced(f_results[c], cells[c][2]) for c in idx]
            exact_by_mask[mask.name] = [r["p_correct"] for r in read]
            flat = [r for c in idx for r in replies[c]]
            per_problem = [sum(r["correct"] for r in replies[c]) / len(replies[c]) for c in idx if replies[c]]
            accuracy_exact = rate_ci([r["correct"] for r in read])
            per_mask[mask.name] = {
                "exact": {
                    "p_correct": mean_ci([r["p_correct"] for r in read], **ci),
                    "accuracy": accuracy_exact,
                    "p_answer_set": mean_ci([sum(r["p"].values()) for r in read], **ci)
                    if first.choices
                    else None,
                    "reliably_wrong": reliably_wrong([r["correct"] for r in read], shares),
                },
                "sampled": {
                    "accuracy": rate_ci([r["correct"] for r in flat]),
                    "accuracy_over_problems": mean_ci(per_problem, **ci),
                    "format_followed": rate_ci([r["how"] == "marker" for r in flat]),
                    "accuracy_answered": rate_ci([r["correct"] for r in flat if r["answer"] is not None]),
                    "reliably_wrong": reliably_wrong(
                        [r["correct"] for r in flat if r["answer"] is not None], shares
                    ),
                },
                "examples": [
                    {
                        "question": cells[c][2].question,
                        "answer": cells[c][2].answer,
                        "forced": {k: v for k, v in r.items() if k != "how"},
                        "replies": replies[c][:3],
                    }
                    for c, r in list(zip(idx, read, strict=True))[: spec.examples]
                ],
            }
        if control is not None:
            for mask in spec.masks:
                diffs = [a - b for a, b in zip(exact_by_mask[mask.name], exact_by_mask[control], strict=True)]
                per_mask[mask.name]["exact"]["p_correct_minus_control"] = mean_ci(diffs, **ci)
        tasks_out.append(
            {
                "label": ts.label,
                "plot": f"capabilities_{slug(ts.label)}.png",
                "n": len(ts.problems),
                "answer_type": first.answer_type,
                "chance": chance,
                "answer_shares": shares,
                "shots": len(ts.exemplars),
                "by_mask": per_mask,
            }
        )
    return {
        "experiment": "capabilities",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "definitions": DEFINITIONS,
        "mask_defs": [m.model_dump() for m in spec.masks],
        "control": control,
        "tasks": tasks_out,
    }


DEFINITIONS = {
    "p_correct": (
        "Exact. The reply is forced to begin with the answer prefix after a direct question (worked examples "
        "answered with the bare answer); the probability that the next word is the right answer: P(its tokens) "
        "x P(the next token does not start with a letter or digit). Mean over problems, 95% bootstrap interval "
        "over problems."
    ),
    "exact accuracy": (
        "Exact (deterministic). The forced answer is the most probable candidate where the answer set is small, "
        "else the greedy continuation's first number; the share of problems where it is right, Wilson 95% "
        "interval over problems."
    ),
    "p_answer_set": "Exact. Total probability of the candidate answers after the prefix (small answer sets only).",
    "p_correct_minus_control": (
        "Exact, paired. Per problem, P(right) under this mask minus under the control mask; mean and bootstrap "
        "interval over problems. Below 0: the mask makes the right answer less likely."
    ),
    "sampled accuracy": (
        "Replies with reasoning (style cot) or direct, greedy at temperature 0 (deterministic) or sampled; the "
        "answer is read after the last 'answer is' (else the last number / True-False word). Share right, "
        "Wilson 95% interval over replies; accuracy_over_problems averages per problem (bootstrap)."
    ),
    "reliably_wrong": (
        "Where the answer set is small: the upper end of the accuracy interval is below the share of the "
        "rarest right answer, what giving that one answer every time would score (1 / number of answers on a "
        "balanced set; the sets are drawn at random, so the shares are given). No rule that ignores the "
        "question can be reliably worse, so being reliably wrong needs the right answer: the model computes "
        "it and the mask hides it. For replies, among those that give an answer (accuracy_answered)."
    ),
}
