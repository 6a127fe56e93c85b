"""The cot experiment's science on the tiny model: free answers read from the continuation alone, forced
answers as exact whole-answer probabilities with no placeholder in the instruction, Lanham's AOC on step cuts
apart from the token grid, mistakes planted at every step, and an AOC that a CoT which changes nothing leaves
at 0."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import plain_logprobs

import maskscope as ms
from maskscope.experiments import cot
from maskscope.models.base import ForcedJob
from maskscope.reasoning.text import answer_start, sentence_cuts, steps
from maskscope.runner import parse_spec
from maskscope.tasks import Problem, TaskSpec, addition, cot_prompt, direct_prompt, extract_answer, load_tasks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _spec(**kw):
    base = {
        "experiment": "cot",
        "name": "t",
        "tasks": [{"kind": "addition", "operands": 3, "digits": 1, "n": 2}],
        "cot_max_tokens": 24,
        "continue_max_tokens": 8,
        "rewrite_max_tokens": 8,
        "percent_step": 25,
        "bootstrap": 200,
    }
    return parse_spec({**base, **kw})[1]


def _with_solutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Store each problem's worked solution ("First, 3 + 6 = 9. Then, 9 + 5 = 14. The answer is 14.") as the
    model's reply, so that the random model has a CoT of two steps with numbers and a stored answer."""
    original = cot._generate_cots

    def generate(model, spec, items, progress):
        original(model, spec, items, progress)
        for it in items:
            it.reply_ids = list(model.tokens(it.problem.solution))
            it.reply_text = it.problem.solution
            it.cot_len = answer_start(it.reply_ids, model.decode)
            it.stored_answer, it.stored_how = extract_answer(it.reply_text, it.problem)
            cot_ids = it.reply_ids[: it.cot_len]
            it.step_ends = steps(sentence_cuts(cot_ids, model.decode), it.cot_len, spec.max_steps)
            bounds = [0, *it.step_ends]
            it.chunks = [model.decode(cot_ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    monkeypatch.setattr(cot, "_generate_cots", generate)


def _p_whole(model, ids: list[int], answer: str) -> float:
    """Direct computation: P(" answer" tokens after ids) x P(the next token does not start with a letter or
    digit), from one plain forward pass."""
    spelling = list(model.tokens(" " + answer))
    lp = plain_logprobs(model, ids + spelling)
    logp = sum(float(lp[len(ids) - 1 + t, tok]) for t, tok in enumerate(spelling))
    texts = model.tokenizer.batch_decode([[i] for i in range(len(model.tokenizer))])
    alnum = torch.tensor([bool(t) and t[0].isalnum() for t in texts])
    p_on = float(torch.exp(lp[-1][: alnum.shape[0]][alnum]).sum())
    return math.exp(logp) * (1.0 - p_on)


# ------------------------------------------------------------------------------------------- item 4
def test_free_answers_are_read_from_the_continuation_only(tiny, monkeypatch: pytest.MonkeyPatch):
    """A summary saying "The answer is 9." is text the rewriter wrote, not the model's answer: the free answer
    after it is what the continuation says (nothing, when it holds no number)."""
    monkeypatch.setattr(cot._Writer, "write", lambda self, texts, *a: ["The answer is 9." for _ in texts])
    out = cot.run(tiny, _spec(conditions=["truncated", "summarized"]))
    q_points = [p for q in out["tasks"][0]["questions"] for p in q["points"]["summarized"] if p["free"]]
    checked = 0
    for p in q_points:
        assert p["free"]["answer"] == extract_answer(p["free"]["continuation"], _problem(out, p))[0]
        if p["x"] > 0 and "9" not in p["free"]["continuation"]:
            assert p["free"]["answer"] != "9"
            checked += 1
    assert checked >= 1


def _problem(out, point) -> Problem:
    return addition(1, operands=3, digits=1)[0]  # only its answer type matters to extract_answer


# ------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("kind", ["addition", "word", "recall", "logic"])
def test_instructions_hold_no_answer_placeholder(kind: str):
    """The instruction may quote "The answer is X." only with a real answer of the problem (True/False), never
    a placeholder ("N", "X") that a model would copy as its answer."""
    problem = load_tasks([TaskSpec(kind=kind, n=1, shots=0)])[0].problems[0]
    for text in (cot_prompt(problem), direct_prompt(problem)):
        for quoted in re.findall(r"answer is ([^\".]+)\.", text):
            assert problem.choices is not None and quoted in problem.choices, text


def test_integer_forced_answers_are_exact_whole_number_probabilities(tiny):
    """No decoding and no parsing: the probability of the right answer and of the full-CoT answer, each as a
    whole number after the answer prefix, equal a direct forward pass; there is no argmax over a few
    numbers."""
    from maskscope.reasoning.answers import exact_forced_job, read_exact

    problem = addition(1, operands=3, digits=1)[0]
    seq = tiny.sequence(cot.Conversation.of(user=problem.question), tiny.tokens("First, 3 + 6 = 9."))
    stored = str(int(problem.answer) + 3)
    job = exact_forced_job(tiny, seq, len(seq.ids), " The answer is", problem, [stored])
    assert isinstance(job, ForcedJob) and job.open_tokens == 0
    assert {c.name for c in job.candidates} == {problem.answer, stored}
    read = read_exact(tiny.forced([job])[0], problem, stored)
    ids = list(seq.ids) + list(tiny.tokens(" The answer is"))
    assert read["p_correct"] == pytest.approx(_p_whole(tiny, ids, problem.answer), rel=1e-4, abs=1e-12)
    assert read["p_agree"] == pytest.approx(_p_whole(tiny, ids, stored), rel=1e-4, abs=1e-12)
    assert read["answer"] is None and read["agree"] is None
    assert read_exact(tiny.forced([job])[0], problem, None)["p_agree"] is None


# ------------------------------------------------------------------------------------------- item 6
def test_lanham_aoc_is_on_step_cuts_and_the_token_grid_is_apart(tiny, monkeypatch: pytest.MonkeyPatch):
    """The headline AOC integrates P_full - P(x) over the step cuts with x = j/n; the token grid's AOC is the
    same integral over 0, 25, ..., 100% of the tokens, a different number; both recomputed here from the
    per-question points."""
    _with_solutions(monkeypatch)
    out = cot.run(tiny, _spec(conditions=["truncated"], tasks=[{"kind": "logic", "hops": 2, "n": 2}]))
    task = out["tasks"][0]
    by_axis: dict[str, list[float]] = {"steps": [], "tokens": []}
    for q in task["questions"]:
        n = len(q["step_ends"])
        assert n == 3
        pts = q["points"]["truncated"]
        steps = [p for p in pts if p["axis"] == "steps"]
        assert [p["x"] for p in steps] == [j / n for j in range(n + 1)]
        assert [p["tokens"] for p in steps] == [0, *q["step_ends"]]
        top = steps[-1]["forced"]["p_agree"]
        assert top == pytest.approx(steps[-1]["forced"]["p_correct"])  # the stored answer is the right one
        for axis in by_axis:
            xy = [(p["x"], p["forced"]["p_agree"]) for p in pts if p["axis"] == axis]
            xs, ys = zip(*xy, strict=True)
            by_axis[axis].append(float(np.trapezoid([top - y for y in ys], xs)))
        tokens = [p for p in pts if p["axis"] == "tokens"]
        assert [p["x"] for p in tokens] == [0, 0.25, 0.5, 0.75, 1.0]
    aoc = task["conditions"]["truncated"]["aoc"]
    steps_aoc, tokens_aoc = aoc["steps"]["forced"]["mean"], aoc["tokens"]["forced"]["mean"]
    assert steps_aoc == pytest.approx(np.mean(by_axis["steps"]), rel=1e-9)
    assert tokens_aoc == pytest.approx(np.mean(by_axis["tokens"]), rel=1e-9)
    assert abs(steps_aoc - tokens_aoc) > 0.01 * max(abs(steps_aoc), abs(tokens_aoc)) > 0


# ------------------------------------------------------------------------------------------- item 7
def test_mistakes_are_planted_at_every_step(tiny, monkeypatch: pytest.MonkeyPatch):
    """Each step gets its own mistake (x = fraction of steps before it), its answer read from what the model
    regenerated; the summary has agreement against the mistake's position; 'further tokens' is no metric."""
    _with_solutions(monkeypatch)
    out = cot.run(tiny, _spec(conditions=["truncated", "mistake"]))
    task = out["tasks"][0]
    for q in task["questions"]:
        ms = q["mistakes"]
        assert [m["step"] for m in ms] == [0, 1] and [m["x"] for m in ms] == [0.0, 0.5]
        for m in ms:
            assert m["mistaken"] != m["original"]
            assert m["free_answer"] == extract_answer(m["continuation"], addition(1)[0])[0]
            assert 0.0 <= m["forced"]["p_agree"] <= 1.0
    mistake = task["mistake"]
    assert mistake["mistakes"] == 2 * task["n"]
    assert len(mistake["by_position"]["free_agree"]) == len(out["grid"])
    assert mistake["by_position"]["p_agree"][-1]["mean"] == pytest.approx(
        task["conditions"]["truncated"]["full"]["p_agree"]["mean"]
    )
    assert "further_tokens" not in task["conditions"]["truncated"]["curves"]["steps"]


# ------------------------------------------------------------------------------------------- item 8
def test_aoc_is_zero_when_the_cot_changes_nothing():
    """Negative control of the measure: a curve that stays at the full-CoT level has AOC 0 at any level (an
    AOC of 1 - area under P would report 1 - P, the model's uncertainty, as load-bearing CoT); a curve that
    starts at 0 has AOC of half the level, as Lanham's deterministic case gives 0.5 for a linear rise."""
    xs = [0.0, 0.5, 1.0]
    for level in (0.3, 0.6, 1.0):
        assert cot.drop_area(xs, [level] * 3, level) == pytest.approx(0.0)
        assert cot.drop_area(xs, [0.0, level / 2, level], level) == pytest.approx(level / 2)


@pytest.mark.bundled
def test_negative_control_example_has_aoc_near_zero(bundled, tmp_path: Path):
    """The shipped negative control (examples/cot_control.yaml, cut to 4 questions): the answer is in the
    question and the CoT holds no number, so Lanham's AOC on the step cuts is near 0, while 1 - the area under
    the same exact curve (the model's uncertainty, which an AOC must not count) is far from 0."""
    spec = yaml.safe_load((EXAMPLES / "cot_control.yaml").read_text(encoding="utf-8"))
    spec["tasks"][0]["n"] = 4
    spec["conditions"] = ["truncated"]
    path = tmp_path / "control.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    out = ms.run_spec(path, out_root=tmp_path / "runs", model=bundled)
    task = json.loads((out / "summary.json").read_text())["tasks"][0]
    aoc = task["conditions"]["truncated"]["aoc"]["steps"]["forced"]
    assert aoc["n"] == 4
    assert abs(aoc["mean"]) < 0.1, aoc
    uncertainty = []
    for q in task["questions"]:
        pts = [p for p in q["points"]["truncated"] if p["axis"] == "steps"]
        area = np.trapezoid([p["forced"]["p_agree"] for p in pts], [p["x"] for p in pts])
        uncertainty.append(1.0 - float(area))
    assert np.mean(uncertainty) > 0.3
