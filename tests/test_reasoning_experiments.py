"""The capabilities and prefill experiments end to end on the tiny model: spec errors in one line, the summary
fields the report and plots read, the files a run writes, the exact numbers against direct computations with
the model's own scoring, and the controls (a mask identical to the control changes nothing; nested markers
are counted once)."""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.errors import UserError
from maskscope.experiments.prefill import MARKER_WORDS, categorize, fill
from maskscope.runner import parse_spec, run, run_spec
from maskscope.store import Store
from maskscope.tasks import addition, load_tasks, turns, wrong_answer

SCRIPT = "<script>alert(1)</script>"


def _one_line_error(spec: dict, *needles: str) -> None:
    with pytest.raises(UserError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    return path


_ALNUM: dict[int, torch.Tensor] = {}


def _starts_alnum(model) -> torch.Tensor:
    """Boolean mask over the vocabulary: tokens whose text starts with a letter or digit."""
    if id(model) not in _ALNUM:
        texts = model.tokenizer.batch_decode([[i] for i in range(len(model.tokenizer))])
        _ALNUM[id(model)] = torch.tensor([bool(t) and t[0].isalnum() for t in texts])
    return _ALNUM[id(model)]


def _p_whole_word(model, context: ms.Conversation, answer_text: str) -> float:
    """Direct computation: P(the reply goes on with `answer_text`) from model.score, times P(the token after
    it does not start with a letter or digit) from a plain forward pass over the prompt + prefill + answer."""
    scored = model.score(context, [answer_text])[0]
    after = ms.Conversation(context.messages, context.prefill + answer_text)
    last = plain_logprobs(model, model.encode_prompt(after))[-1]
    alnum = _starts_alnum(model)
    p_continues = float(torch.exp(last[: alnum.shape[0]][alnum]).sum())
    return math.exp(scored.total) * (1.0 - p_continues)


# ------------------------------------------------------------------------------------------ capabilities
CAP_BASE = {
    "experiment": "capabilities",
    "name": "cap",
    "tasks": [{"kind": "addition", "operands": 2, "digits": 1, "n": 2}],
    "masks": [{"name": "plain", "control": True}],
}


def test_capabilities_spec_errors_are_one_line():
    _one_line_error({**CAP_BASE, "masks": []}, "masks")
    _one_line_error({**CAP_BASE, "masks": [{"name": "a"}, {"name": "a", "system": "x"}]}, "unique", "a")
    _one_line_error(
        {**CAP_BASE, "masks": [{"name": "a", "control": True}, {"name": "b", "control": True}]},
        "at most one mask",
    )
    _one_line_error({**CAP_BASE, "samples": 3, "temperature": 0}, "temperature > 0")
    _one_line_error({**CAP_BASE, "style": "verbose"}, "style")
    _one_line_error({**CAP_BASE, "masks": [{"name": "a", "sistem": "typo"}]}, "sistem")
    _one_line_error({**CAP_BASE, "tasks": [{"kind": "logic", "hops": 0}]}, "hops")
    _, spec = parse_spec(CAP_BASE)
    assert spec.samples == 1 and spec.masks[0].control


@pytest.fixture(scope="module")
def cap_run(tiny, tmp_path_factory: pytest.TempPathFactory):
    """One capabilities run on the tiny model: an addition and a True/False task, the control, a mask with
    exactly the control's conditioning under another name, and a mask with a system prompt."""
    root = tmp_path_factory.mktemp("cap")
    spec = {
        **CAP_BASE,
        "name": "cap-test",
        "tasks": [
            {"kind": "addition", "operands": 2, "digits": 1, "n": 3, "shots": 1},
            {"kind": "logic", "hops": 1, "distractors": 0, "n": 3, "shots": 0},
        ],
        "masks": [
            {"name": "plain", "control": True},
            {"name": "same-as-control"},
            {"name": "pirate", "system": "You are a pirate. " + SCRIPT},
        ],
        "max_new_tokens": 8,
        "examples": 3,
    }
    out = run_spec(_write(root, spec), out_root=root / "runs", model=tiny)
    return root, out, json.loads((out / "summary.json").read_text())


def test_capabilities_run_writes_summary_plots_and_escaped_report(cap_run):
    root, out, summary = cap_run
    assert out.parent == root / "runs" and (root / "runs" / "cap-test").resolve() == out.resolve()
    assert [t["label"] for t in summary["tasks"]] == ["addition 2x1d", "logic 1-hop"]
    assert summary["control"] == "plain"
    add, logic = summary["tasks"]
    assert add["chance"] is None and logic["chance"] == 0.5
    assert add["answer_shares"] is None and sum(logic["answer_shares"].values()) == pytest.approx(1.0)
    assert add["shots"] == 1 and logic["shots"] == 0
    for task in summary["tasks"]:
        assert (out / task["plot"]).is_file()
        for name in ("plain", "same-as-control", "pirate"):
            row = task["by_mask"][name]
            for key in (
                "p_correct",
                "accuracy",
                "p_correct_minus_control",
                "below_blind_rules",
                "against_control",
            ):
                assert key in row["exact"]
            assert row["exact"]["accuracy"]["n"] == 3
            assert row["sampled"]["accuracy"]["n"] == 3  # one greedy reply per problem
            assert row["sampled"]["format_followed"]["n"] == 3
            assert len(row["examples"]) == 3 and len(row["examples"][0]["replies"]) == 1
    # the True/False task: both candidates scored, their mass at most 1
    for row in logic["by_mask"].values():
        for ex in row["examples"]:
            assert set(ex["forced"]["p"]) == {"True", "False"}
            assert 0 < sum(ex["forced"]["p"].values()) <= 1 + 1e-9
    assert add["by_mask"]["plain"]["exact"]["p_answer_set"] is None
    html = (out / "report.html").read_text()
    assert "pirate" in html and "addition 2x1d" in html
    assert SCRIPT not in html and "&lt;script&gt;" in html  # the spec's text is escaped too
    from maskscope.report import render_report

    summary = copy.deepcopy(summary)
    summary["tasks"][0]["by_mask"]["plain"]["examples"][0]["replies"][0]["text"] = SCRIPT + "reply"
    html = render_report(summary, root).read_text()
    assert SCRIPT + "reply" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;reply" in html


def test_capabilities_exact_p_right_equals_model_score(cap_run, tiny):
    """P(right answer) of each problem equals P(" answer" after the forced "The answer is") from model.score
    times P(the word ends there), from the model's full next-token distribution; for True/False both
    spellings (" True", " true") are summed."""
    _, _, summary = cap_run
    spec_tasks = parse_spec(summary["spec"])[1].tasks
    for ts, task in zip(load_tasks(spec_tasks), summary["tasks"], strict=True):
        for mask_name, system in (("plain", None), ("pirate", "You are a pirate. " + SCRIPT)):
            examples = task["by_mask"][mask_name]["examples"]
            for p, ex in zip(ts.problems, examples, strict=True):
                assert ex["question"] == p.question
                head = [ms.Message("system", system)] if system else []
                ctx = ms.Conversation(tuple(head + turns(p, ts.exemplars, style="direct")), "The answer is")
                spellings = [f" {p.answer}", f" {p.answer.lower()}"] if p.choices else [f" {p.answer}"]
                direct = sum(_p_whole_word(tiny, ctx, s) for s in dict.fromkeys(spellings))
                assert ex["forced"]["p_correct"] == pytest.approx(direct, rel=1e-4, abs=1e-12)
                assert ex["forced"]["p_correct"] > 0


def test_capabilities_paired_difference_controls(cap_run):
    """A mask that is the control under another name gives a paired difference of exactly 0 (negative
    control); a system prompt moves P(right) (positive control), and the paired mean is the difference of
    the two means."""
    _, _, summary = cap_run
    for task in summary["tasks"]:
        same = task["by_mask"]["same-as-control"]
        assert same["exact"]["p_correct_minus_control"]["mean"] == 0.0
        assert same["exact"]["p_correct_minus_control"]["ci95"] == [
            0.0,
            0.0,
        ]  # identical numbers, not sampled
        assert same["exact"]["p_correct_minus_control"]["p_value"] == 1.0
        assert same["exact"]["against_control"]["mcnemar_less"]["p_value"] == 1.0
        assert not same["exact"]["against_control"]["wrong_where_control_right"]
        assert same["exact"]["p_correct"] == task["by_mask"]["plain"]["exact"]["p_correct"]
        assert same["sampled"] == task["by_mask"]["plain"]["sampled"]
        pirate = task["by_mask"]["pirate"]["exact"]
        plain = task["by_mask"]["plain"]["exact"]
        diff = pirate["p_correct_minus_control"]["mean"]
        assert diff != 0.0
        assert diff == pytest.approx(pirate["p_correct"]["mean"] - plain["p_correct"]["mean"], abs=1e-12)


def test_capabilities_greedy_replies_equal_model_sample(cap_run, tiny):
    """The greedy replies (KV engine, batched) are what model.sample gives at temperature 0."""
    _, _, summary = cap_run
    spec_tasks = parse_spec(summary["spec"])[1].tasks
    ts = load_tasks(spec_tasks)[0]
    for p, ex in zip(ts.problems, summary["tasks"][0]["by_mask"]["plain"]["examples"], strict=True):
        ctx = ms.Conversation(tuple(turns(p, ts.exemplars, style="cot")))
        ref = tiny.sample(ctx, n=1, max_new_tokens=8, temperature=0)[0].text
        assert ex["replies"][0]["text"] == ref


def test_capabilities_rerun_is_served_from_the_store(cap_run, tiny):
    root, out, summary = cap_run
    with Store(root / "runs" / "maskscope.sqlite") as store:
        before = store.count()
    run_spec(_write(root, summary["spec"]), out_root=root / "runs", model=tiny)
    again = json.loads((out / "summary.json").read_text())
    assert (
        again["run"]["misses"] == 0
        and again["run"]["hits"] == summary["run"]["hits"] + summary["run"]["misses"]
    )
    assert again["tasks"] == summary["tasks"]
    with Store(root / "runs" / "maskscope.sqlite") as store:
        assert store.count() == before


def test_below_blind_rules_is_an_exact_test_against_the_rarest_answer():
    """Giving one answer every time is never below the floor, however unbalanced the set (negative control:
    on this seed's set a third of the answers are True, so always "True" scores below the chance level of
    1/2 but not below the floor); always the wrong answer is (positive control). The p-value is the binomial
    tail at the rarest answer's share, by hand; two answers are too few to tell."""
    from scipy.stats import binom

    from maskscope.experiments.capabilities import answer_shares, below_blind_rules
    from maskscope.tasks import logic_chains

    problems = logic_chains(24, hops=1, distractors=0, seed=0)
    shares = answer_shares(problems)
    assert shares is not None and set(shares) == {"True", "False"}
    assert shares["True"] == sum(p.answer == "True" for p in problems) / 24 == 8 / 24
    always_true = below_blind_rules([p.answer == "True" for p in problems], shares)
    assert (
        always_true["p_value"] == pytest.approx(binom.cdf(8, 24, 8 / 24)) and not always_true["significant"]
    )
    assert not below_blind_rules([p.answer == "False" for p in problems], shares)["significant"]
    wrong = below_blind_rules([False] * 24, shares)
    assert wrong["significant"] and wrong["p_value"] == pytest.approx((2 / 3) ** 24)
    assert not below_blind_rules([False] * 2, shares)["significant"]  # too few to tell
    # one-sided at 5%: 10 of 30 on a balanced set is below the floor of 1/2 (p = 0.049)
    assert below_blind_rules([True] * 10 + [False] * 20, {"True": 0.5, "False": 0.5})[
        "p_value"
    ] == pytest.approx(binom.cdf(10, 30, 0.5))
    assert below_blind_rules([False] * 30, None) is None


def test_against_control_is_paired():
    """Mask vs control on the same problems. A mask that is wrong exactly where the control is right is
    flagged (McNemar and Fisher, checked by hand); a mask equal to the control, or wrong on other problems
    than the control at the same rate, is not."""
    from scipy.stats import binom, hypergeom

    from maskscope.experiments.capabilities import against_control

    control = [True] * 16 + [False] * 4
    liar = [not c for c in control]
    out = against_control(liar, control)
    assert out["mcnemar_less"]["a_only"] == 4 and out["mcnemar_less"]["b_only"] == 16
    assert out["mcnemar_less"]["p_value"] == pytest.approx(binom.cdf(4, 20, 0.5))
    assert out["table"]["control_right"] == [0, 16] and out["table"]["control_wrong"] == [4, 0]
    assert out["fisher_less_p"] == pytest.approx(hypergeom.cdf(0, 20, 16, 4))
    assert out["wrong_where_control_right"]
    assert out["accuracy_minus_control"]["mean"] == pytest.approx(4 / 20 - 16 / 20)
    same = against_control(control, control)
    assert same["mcnemar_less"]["p_value"] == 1.0 and not same["wrong_where_control_right"]
    # worse than the control, but not where the control is right: independent of it, so Fisher does not flag
    rng = np.random.default_rng(0)
    control = list(rng.random(60) < 0.8)
    unrelated = list(rng.random(60) < 0.3)
    out = against_control(unrelated, control)
    assert out["mcnemar_less"]["p_value"] < 0.05 and out["fisher_less_p"] > 0.05
    assert not out["wrong_where_control_right"]


def test_capabilities_refuses_a_backend_without_the_engine(tmp_path: Path):
    _, spec = parse_spec(CAP_BASE)
    remote = type("Remote", (), {"name": "remote", "capabilities": (), "fingerprint": lambda self: {}})()
    from maskscope.experiments import EXPERIMENTS

    with pytest.raises(UserError, match="needs .cuts."):
        run(EXPERIMENTS["capabilities"], spec, out_root=tmp_path, model=remote)
    with Store(tmp_path / "maskscope.sqlite") as store:
        assert store.run_record("cap")["status"] == "interrupted"
    assert not (tmp_path / "cap" / "summary.json").exists()


# ------------------------------------------------------------------------------------------ prefill
PRE_BASE = {"experiment": "prefill", "name": "pre", "tasks": [{"kind": "addition", "n": 2}]}


def test_prefill_spec_errors_are_one_line():
    _one_line_error({**PRE_BASE, "prefills": [{"name": "x", "text": "It is {answr}."}]}, "prefills", "answr")
    _one_line_error(
        {**PRE_BASE, "prefills": [{"name": "x", "text": "a"}, {"name": "x", "text": "b"}]}, "unique", "x"
    )
    _one_line_error({**PRE_BASE, "prefills": []}, "prefills")
    _one_line_error({**PRE_BASE, "markers": [" Wait", ""]}, "markers")
    _one_line_error({**PRE_BASE, "marker_pattern": "(unclosed"}, "marker_pattern")
    _one_line_error({**PRE_BASE, "samples": -1}, "samples")
    _one_line_error({**PRE_BASE, "mask": {"name": "m", "system": "s", "colour": "red"}}, "colour")
    _, spec = parse_spec(PRE_BASE)
    assert [q.name for q in spec.prefills] == ["wrong", "right"] and spec.prefills[1].control


def test_categories_of_what_follows():
    (p,) = addition(1, operands=2, digits=1, seed=3)
    pattern = re.compile(MARKER_WORDS, re.IGNORECASE)
    right = p.answer
    assert categorize("  \n", p, pattern) == "ends"
    assert categorize(f" Wait, it is {right}.", p, pattern) == "states_right"
    assert categorize(f" It is 1{right}. Sorry.", p, pattern) == "self_correction"  # not the whole number
    assert categorize(f" So {right}.5 then", p, pattern) == "other"  # a decimal is not the answer
    assert categorize(" Actually, no.", p, pattern) == "self_correction"
    assert categorize(" Awaiting more input.", p, pattern) == "other"  # 'wait' only as a whole word
    wrong = wrong_answer(p, random.Random("0:x"))
    assert wrong != right and 1 <= abs(int(wrong) - int(right)) <= 10
    assert fill("{wrong} not {answer}", p, wrong) == f"{wrong} not {right}"


MARKERS = [" Wait", " Wait a", " Sorry", "\n\nActually"]


@pytest.fixture(scope="module")
def pre_run(tiny, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pre")
    spec = {
        **PRE_BASE,
        "name": "pre-test",
        "tasks": [{"kind": "addition", "operands": 2, "digits": 1, "n": 3, "shots": 0}],
        "prefills": [
            {"name": "wrong", "text": "The answer is {wrong}."},
            {"name": "right", "text": "The answer is {answer}.", "control": True},
            {"name": "markup", "text": SCRIPT + " {answer}"},
        ],
        "markers": MARKERS,
        "samples": 4,
        "max_new_tokens": 6,
        "examples": 12,
    }
    out = run_spec(_write(root, spec), out_root=root / "runs", model=tiny)
    return root, out, json.loads((out / "summary.json").read_text())


def _contexts(summary: dict, prefill_name: str) -> list[ms.Conversation]:
    """The contexts the experiment should have scored, rebuilt from the spec."""
    spec = parse_spec(summary["spec"])[1]
    text = next(q.text for q in spec.prefills if q.name == prefill_name)
    out = []
    for ts in load_tasks(spec.tasks):
        for p in ts.problems:
            wrong = wrong_answer(p, random.Random(f"{spec.seed}:{p.id}"))
            out.append(spec.mask.conversation(turns(p, ts.exemplars, style=spec.style), fill(text, p, wrong)))
    return out


def test_prefill_run_writes_summary_plot_and_escaped_report(pre_run):
    root, out, summary = pre_run
    assert (root / "runs" / "pre-test").resolve() == out.resolve() and (out / "prefill.png").is_file()
    assert summary["n_problems"] == 3
    assert [q["name"] for q in summary["prefills"]] == ["wrong", "right", "markup"]
    for name, row in summary["by_prefill"].items():
        assert set(row["exact"]["per_marker"]) == set(MARKERS)
        assert row["exact"]["p_marker"]["n"] == 3 and row["exact"]["p_end"]["n"] == 3
        cats = row["sampled"]["categories"]
        assert row["sampled"]["n"] == 12 and set(cats) == set(summary["categories"])
        assert sum(c["k"] for c in cats.values()) == 12  # every continuation in exactly one category
        assert len(row["examples"]) == 12
        for ex in row["examples"]:
            assert ex["prefill"].endswith("." if name != "markup" else ex["answer"])
    wrong_examples = summary["by_prefill"]["wrong"]["examples"]
    assert all(ex["prefill"] != f"The answer is {ex['answer']}." for ex in wrong_examples)
    # four continuations nest in each problem: the intervals say so
    for cat in summary["categories"]:
        v = summary["by_prefill"]["wrong"]["sampled"]["categories"][cat]
        assert v["clusters"] == 3 and ("cluster" in v["method"] or "problems as units" in v["method"])
        assert v["ci95"][1] > v["ci95"][0]
    html = (out / "report.html").read_text()
    assert SCRIPT not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    from maskscope.report import render_report

    summary = copy.deepcopy(summary)
    summary["by_prefill"]["right"]["examples"][0]["continuation"] = "<img src=x onerror=alert(2)>"
    html = render_report(summary, root).read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html


def test_prefill_marker_probabilities_equal_model_score(pre_run, tiny):
    """Each marker's exact probability (mean over problems) is what model.score gives for the same context
    (question + prefill) and continuation; the union counts " Wait a" inside " Wait" once, so it is
    P(" Wait") + P(" Sorry") + P("\\n\\nActually"); P(end) is the end-of-sequence probability of a plain forward
    pass over the prompt."""
    _, _, summary = pre_run
    for name in ("wrong", "right", "markup"):
        contexts = _contexts(summary, name)
        exact = summary["by_prefill"][name]["exact"]
        per_problem = [{s.continuation: s.prob for s in tiny.score(ctx, MARKERS)} for ctx in contexts]
        for m in MARKERS:
            mean = sum(p[m] for p in per_problem) / len(per_problem)
            # rel 1e-5: the run batches the contexts (sharing their common prefix), model.score takes
            # one at a time; fp32 sums in another order differ by ~1e-6 in log-probability
            assert exact["per_marker"][m]["mean"] == pytest.approx(mean, rel=1e-5, abs=1e-15)
        union = [p[" Wait"] + p[" Sorry"] + p["\n\nActually"] for p in per_problem]
        assert all(p[" Wait a"] < p[" Wait"] for p in per_problem)
        assert exact["p_marker"]["mean"] == pytest.approx(sum(union) / len(union), rel=1e-5)
        ends = []
        for ctx in contexts:
            last = plain_logprobs(tiny, tiny.encode_prompt(ctx))[-1]
            ends.append(float(torch.exp(last[sorted(tiny.eos_ids)]).sum()))
        assert exact["p_end"]["mean"] == pytest.approx(sum(ends) / len(ends), rel=1e-4)
    # the wrong and the right prefill are different contexts: their numbers differ
    assert (
        summary["by_prefill"]["wrong"]["exact"]["per_marker"][" Wait"]["mean"]
        != summary["by_prefill"]["right"]["exact"]["per_marker"][" Wait"]["mean"]
    )


def test_prefill_wrong_minus_right_is_paired(pre_run, tiny):
    """The wrong prefill is compared with the right one (the control) problem by problem: the paired mean is
    the mean of per-problem differences of model.score's numbers, its p-value the signed-rank test's; the
    control is not compared with itself."""
    from scipy.stats import wilcoxon

    _, _, summary = pre_run
    assert summary["control"] == "right" and set(summary["minus_control"]) == {"wrong", "markup"}
    per = {}
    for name in ("wrong", "right"):
        per[name] = [
            sum(s.prob for s in tiny.score(ctx, [" Wait", " Sorry", "\n\nActually"]))
            for ctx in _contexts(summary, name)
        ]
    diffs = np.subtract(per["wrong"], per["right"])
    paired = summary["minus_control"]["wrong"]["p_marker"]
    assert paired["mean"] == pytest.approx(diffs.mean(), rel=1e-5, abs=1e-12)
    assert paired["n"] == 3 and paired["p_value"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
    for cat in summary["categories"]:
        assert cat in summary["minus_control"]["wrong"]


def test_prefill_samples_are_seeded_and_resume(pre_run, tiny):
    """A rerun computes nothing; another seed gives other samples (and other wrong answers)."""
    root, out, summary = pre_run
    spec = dict(summary["spec"])
    run_spec(_write(root, spec), out_root=root / "runs", model=tiny)
    again = json.loads((out / "summary.json").read_text())
    assert again["run"]["misses"] == 0
    assert again["by_prefill"] == summary["by_prefill"]
    other = {**spec, "name": "pre-seed", "seed": 1, "prefills": spec["prefills"][1:2]}
    out2 = run_spec(_write(root, other), out_root=root / "runs", model=tiny)
    changed = json.loads((out2 / "summary.json").read_text())["by_prefill"]["right"]
    first = summary["by_prefill"]["right"]["exact"]  # exact numbers do not depend on the seed (intervals do)
    assert changed["exact"]["p_marker"]["mean"] == first["p_marker"]["mean"]
    assert changed["exact"]["p_end"]["mean"] == first["p_end"]["mean"]
    conts = [e["continuation"] for e in summary["by_prefill"]["right"]["examples"]]
    assert [e["continuation"] for e in changed["examples"]] != conts
