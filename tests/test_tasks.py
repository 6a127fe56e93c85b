"""Task generators: answers checked by an independent computation, seeded determinism, JSONL loading and its
errors, answer extraction, and the few-shot conversation."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskscope import tasks as T
from maskscope.errors import UserError
from maskscope.runner import parse_spec


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 10**6))
def test_addition_answers_are_the_sums_of_the_numbers_in_the_question(operands, digits, seed):
    for p in T.addition(5, operands=operands, digits=digits, seed=seed):
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        assert len(numbers) == operands
        assert all(len(str(n)) == digits for n in numbers)
        assert int(p.answer) == sum(numbers)
        assert p.solution is not None and p.solution.endswith(f"The answer is {p.answer}.")
        # every partial sum in the worked solution is right
        for a, b, c in re.findall(r"(\d+) \+ (\d+) = (\d+)", p.solution):
            assert int(a) + int(b) == int(c)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(0, 10**6))
def test_word_problem_answers(digits, seed):
    for p in T.word_problems(5, digits=digits, seed=seed):
        m = re.match(r"(\w+) has (\d+) (\w+)\. \1 gets (\d+) more \3, then gives (\d+) \3 away\.", p.question)
        assert m, p.question
        a, b, c = int(m.group(2)), int(m.group(4)), int(m.group(5))
        assert c <= a + b
        assert int(p.answer) == a + b - c >= 0


def _entails(question: str) -> bool:
    """Forward chaining over the problem's own sentences: is the entity the property?"""
    facts, ask = question.split(" True or false: ")
    entity, prop = re.match(r"(\w+) is (\w+)\.", ask).groups()
    isa = dict(re.findall(r"Every (\w+) is a (\w+)\.", facts))
    props = {c: not neg for c, neg, p in re.findall(r"Every (\w+) is (not )?(\w+)\.", facts) if p == prop}
    concept = re.search(rf"{entity} is a (\w+)\.", facts).group(1)
    seen = set()
    while concept not in props:
        assert concept not in seen, "cycle"
        seen.add(concept)
        concept = isa[concept]
    return props[concept]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 4), st.integers(0, 10**6))
def test_logic_answers_follow_from_the_facts(hops, distractors, seed):
    for p in T.logic_chains(4, hops=hops, distractors=distractors, seed=seed):
        assert p.answer == ("True" if _entails(p.question) else "False")
        assert p.choices == ("True", "False")
        assert p.question.count("Every") == hops + distractors


def test_logic_answers_are_balanced_and_distractors_contradict():
    problems = T.logic_chains(200, hops=3, seed=1)
    trues = sum(p.answer == "True" for p in problems)
    assert 70 < trues < 130
    p = T.logic_chains(1, hops=1, distractors=1, seed=3)[0]
    polarities = re.findall(r"Every \w+ is (not )?\w+\.", p.question)
    assert sorted(polarities) == ["", "not "]  # the distractor has the opposite polarity


def test_generators_are_seeded():
    for make in (
        lambda s: T.addition(8, operands=3, digits=2, seed=s),
        lambda s: T.word_problems(8, digits=2, seed=s),
        lambda s: T.logic_chains(8, hops=3, seed=s),
    ):
        assert make(4) == make(4)
        assert [p.question for p in make(4)] != [p.question for p in make(5)]


def test_exemplars_come_from_another_seed_and_are_not_asked():
    spec = T.TaskSpec(kind="addition", operands=2, digits=1, n=30, shots=3)
    asked = {p.question for p in spec.problems()}
    shots = spec.exemplars()
    assert len(shots) == 3 and not asked & {p.question for p in shots}
    conv = T.conversation(spec.problems()[0], shots, system="S")
    roles = [m.role for m in conv.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert conv.messages[2].content == shots[0].solution
    direct = T.conversation(spec.problems()[0], shots, style="direct")
    assert direct.messages[1].content == f"The answer is {shots[0].answer}."


def test_load_jsonl_infers_answer_types(tmp_path: Path):
    def write(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
        return path

    ints = T.load_jsonl(
        write("ints.jsonl", [{"question": "q", "answer": "1,200"}, {"question": "r", "answer": 7}])
    )
    assert [p.answer for p in ints] == ["1200", "7"] and ints[0].answer_type == "integer"
    bools = T.load_jsonl(
        write("b.jsonl", [{"question": "q", "answer": "true"}, {"question": "r", "answer": False}])
    )
    assert [p.answer for p in bools] == ["True", "False"] and bools[0].choices == ("True", "False")
    mc = [{"question": f"q{i}", "answer": "AB"[i % 2], "choices": ["A", "B", "C"]} for i in range(4)]
    choice = T.load_jsonl(write("mc.jsonl", mc))
    assert choice[0].answer_type == "choice" and choice[0].choices == ("A", "B", "C")
    text = T.load_jsonl(write("t.jsonl", [{"question": "capital?", "answer": "Paris"}]))
    assert text[0].answer_type == "text" and text[0].choices is None
    spec = T.TaskSpec(kind="jsonl", path=str(tmp_path / "mc.jsonl"), n=3, shots=1)
    assert [p.question for p in spec.exemplars()] == ["q0"]
    assert [p.question for p in spec.problems()] == ["q1", "q2", "q3"]


def test_jsonl_errors_are_one_line(tmp_path: Path):
    with pytest.raises(UserError, match="task file not found"):
        T.load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": 1}\n{not json}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        T.load_jsonl(bad)
    bad.write_text('{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: each line must be an object"):
        T.load_jsonl(bad)
    bad.write_text('{"question": "q", "answer": "D", "choices": ["A", "B"]}\n', encoding="utf-8")
    with pytest.raises(UserError, match="not one of its choices"):
        T.load_jsonl(bad)


def test_task_spec_errors_through_a_spec():
    base = {"experiment": "cot", "name": "x"}
    with pytest.raises(UserError) as e:
        parse_spec({**base, "tasks": [{"kind": "jsonl"}]})
    assert "needs a 'path'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"tasks\.0\.digits"):
        parse_spec({**base, "tasks": [{"kind": "addition", "digits": 0}]})
    with pytest.raises(UserError, match="unique"):
        T.load_tasks([T.TaskSpec(kind="addition"), T.TaskSpec(kind="addition", seed=2)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First, 3 + 4 = 7. The answer is 7.", ("7", "marker")),
        ("So the answer is: 1,234 apples", ("1234", "marker")),
        ("The answer is -5.", ("-5", "marker")),
        ("I think 3 + 4 = 7, then 7 + 1 = 8", ("8", "fallback")),
        ("The answer is unclear, maybe 12", ("12", "marker")),
        ("The answer is unclear.\nI guess 12 or 13", ("13", "fallback")),
        ("no numbers here", (None, "none")),
    ],
)
def test_extract_integer_answers(text, expected):
    problem = T.addition(1)[0]
    assert T.extract_answer(text, problem) == expected


def test_extract_boolean_and_choice_answers():
    logic = T.logic_chains(1)[0]
    assert T.extract_answer("Max is not loud. The answer is False.", logic) == ("False", "marker")
    assert T.extract_answer("The answer is: yes", logic) == ("True", "marker")
    assert T.extract_answer("It is true that... no wait, false", logic) == ("False", "fallback")
    mc = T.Problem("m", "q", "B", "choice", "mc", choices=("A", "B", "C"))
    assert T.extract_answer("The answer is (B).", mc) == ("B", "marker")
    assert T.extract_answer("A cat. The answer is c", mc) == ("C", "marker")
    assert T.is_correct("B", mc) and not T.is_correct(None, mc)
    text = T.Problem("t", "capital?", "Paris", "text", "geo")
    assert T.extract_answer("The answer is Paris. It is big.", text) == ("paris", "marker")
    assert T.is_correct("paris", text)


def test_wrong_answers_are_wrong():
    rng = random.Random(0)
    for p in T.addition(50, operands=2, digits=1) + T.logic_chains(10):
        w = T.wrong_answer(p, rng)
        assert w != p.answer
        if p.answer_type == "integer":
            assert 0 < abs(int(w) - int(p.answer)) <= 10 and int(w) >= 0
    with pytest.raises(UserError):
        T.wrong_answer(T.Problem("t", "q", "x", "text", "t"), rng)
