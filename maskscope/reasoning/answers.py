"""Forced answers for task problems: which candidates are scored exactly, and how a forced answer is read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maskscope.models.base import Candidate, ForcedJob, Seq, Tokenizing
from maskscope.tasks import Problem, is_correct, parse_answer


def spellings(problem: Problem, answer: str) -> list[str]:
    """The spellings of an answer right after "The answer is": " True" and " true" for booleans, else " X"."""
    if problem.answer_type == "boolean":
        return [f" {answer}", f" {answer.lower()}"]
    return [f" {answer}"]


def candidates(model: Tokenizing, problem: Problem, extra: Sequence[str | None] = ()) -> tuple[Candidate, ...]:
    """The candidates scored exactly: the whole answer set when it is small, else the right answer and any
    extra answers (e.g. the answer the full chain of thought gave)."""
    names = list(problem.choices) if problem.choices else [problem.answer]
    for e in extra:
        if e is not None and e not in names:
            names.append(e)
    return tuple(model.candidate(n, spellings(problem, n)) for n in names)


def forced_job(
    model: Tokenizing, seq: Seq, cut: int, answer_prefix: str, problem: Problem, extra: Sequence[str | None] = ()
) -> ForcedJob:
    """The forced-answer job at a cut: `answer_prefix` (leading spaces dropped when nothing precedes it in
    the assistant's turn), the exact candidate probabilities, and for open answers a short greedy answer."""
    text = answer_prefix.lstrip() if cut == seq.prompt_len else answer_prefix
    small = problem.choices is not None
    return ForcedJob(
        seq,
        cut,
        model.tokens(text),
        candidates(model, problem, extra),
        open_tokens=0 if small else (8 if problem.answer_type == "integer" else 16),
        open_until="number" if problem.answer_type == "integer" else "sentence",
    )


def read_forced(result: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """The forced answer: the most probable candidate where the answer set is small (exact), else the answer
    parsed from the greedy continuation; with the exact probability of the right answer."""
    p = result["p"]
    if problem.choices:
        answer = max(problem.choices, key=lambda c: p.get(c, 0.0))
        how = "argmax over candidates (exact)"
    else:
        answer = parse_answer(result.get("open_text") or "", problem)
        how = "greedy continuation"
    return {
        "answer": answer,
        "how": how,
        "correct": is_correct(answer, problem),
        "p_correct": p.get(problem.answer, 0.0),
        "p": p,
        "open_text": result.get("open_text"),
    }
