"""Tasks with exact answers: procedurally generated problems with a difficulty knob, seeded, and JSONL files.

Generators:
- `addition(n, operands, digits)`: "What is 23 + 45?";
- `word_problems(n, digits)`: a person has a things, gets b more, gives c away; how many now?;
- `logic_chains(n, hops)`: ProntoQA-like chains over made-up concept names, answered True or False;
- `recall(n, digits)`: the answer is stated in the question ("Ana has 7 apples and 3 pencils. How many apples
  does Ana have?") and the worked chain of thought holds nothing about it (the negative control of `cot`);
- `load_jsonl(path)`: `{"question", "answer"}` per line.

Every problem carries its answer in canonical form, the answer's type (integer, boolean, choice or text) and,
where the answer set is small, the set itself (`choices`), so that experiments can compute the exact
probability of each candidate answer. `extract_answer` reads a model's answer out of free text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope.errors import UserError
from maskscope.models.base import Conversation, Message

AnswerType = Literal["integer", "boolean", "choice", "text"]
MAX_CHOICES = 12
EXEMPLAR_SEED_OFFSET = 1_000_003

NAMES = (
    "Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam",
    "Mara", "Nico", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Victor",
)  # fmt: skip
THINGS = (
    "apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "stamps", "cookies",
    "balloons", "buttons",
)  # fmt: skip
CONCEPTS = (
    "wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus",
    "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus", "felpus",
)  # fmt: skip
PROPERTIES = (
    "bright", "cold", "large", "happy", "red", "fast", "sour", "kind", "wooden", "shy", "loud", "spicy",
)  # fmt: skip
ENTITIES = ("Max", "Alex", "Sam", "Rex", "Fae", "Polly", "Stella", "Wren", "Sally", "Otto")


@dataclass(frozen=True)
class Problem:
    """One question with its exact answer.

    `answer` is canonical: an integer's decimal digits, "True"/"False", one of `choices`, or free text.
    `choices` is the small answer set when there is one (booleans, multiple choice), else None.
    `solution` is a worked chain of thought ending in "The answer is ...", used for few-shot examples."""

    id: str
    question: str
    answer: str
    answer_type: AnswerType
    task: str
    choices: tuple[str, ...] | None = None
    difficulty: dict[str, Any] = field(default_factory=dict)
    solution: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "task": self.task,
            "choices": list(self.choices) if self.choices is not None else None,
            "difficulty": dict(self.difficulty),
            "solution": self.solution,
        }


def _rng(kind: str, seed: int, **params: Any) -> random.Random:
    """A generator seeded by the task kind, seed and parameters (string seeds are hashed with SHA-512)."""
    key = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return random.Random(f"{kind}:{seed}:{key}")


def _number(rng: random.Random, digits: int) -> int:
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def addition(n: int, *, operands: int = 2, digits: int = 2, seed: int = 0) -> list[Problem]:
    """`n` sums of `operands` numbers of exactly `digits` digits each ("What is 23 + 45?")."""
    if operands < 2 or digits < 1:
        raise UserError("addition needs operands >= 2 and digits >= 1")
    rng = _rng("addition", seed, operands=operands, digits=digits)
    out = []
    for i in range(n):
        terms = [_number(rng, digits) for _ in range(operands)]
        partial, lines = terms[0], []
        for k, t in enumerate(terms[1:]):
            lines.append(f"{'First' if k == 0 else 'Then'}, {partial} + {t} = {partial + t}.")
            partial += t
        out.append(
            Problem(
                id=f"addition-{operands}x{digits}-{seed}-{i}",
                question=f"What is {' + '.join(map(str, terms))}?",
                answer=str(sum(terms)),
                answer_type="integer",
                task="addition",
                difficulty={"operands": operands, "digits": digits},
                solution=" ".join([*lines, f"The answer is {partial}."]),
            )
        )
    return out


def word_problems(n: int, *, digits: int = 1, seed: int = 0) -> list[Problem]:
    """`n` two-step word problems: a person has a things, gets b more, then gives c away (c <= a + b); the
    numbers have up to `digits` digits."""
    if digits < 1:
        raise UserError("word problems need digits >= 1")
    rng = _rng("word", seed, digits=digits)
    out = []
    for i in range(n):
        name, things = rng.choice(NAMES), rng.choice(THINGS)
        a, b = _number(rng, digits), _number(rng, digits)
        c = rng.randint(1, a + b)
        question = (
            f"{name} has {a} {things}. {name} gets {b} more {things}, then gives {c} {things} away. "
            f"How many {things} does {name} have now?"
        )
        out.append(
            Problem(
                id=f"word-{digits}-{seed}-{i}",
                question=question,
                answer=str(a + b - c),
                answer_type="integer",
                task="word",
                difficulty={"digits": digits},
                solution=(
                    f"{name} starts with {a} {things}. After getting {b} more, {name} has {a} + {b} = {a + b}. "
                    f"After giving {c} away, {name} has {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
                ),
            )
        )
    return out


def recall(n: int, *, digits: int = 1, seed: int = 0) -> list[Problem]:
    """`n` questions whose answer is stated in the question: a person has a things and b other things; how
    many of the first does the person have? The worked solution's chain of thought is the same sentence for
    every question and holds no number, so it cannot carry the answer: the negative control of `cot`."""
    if digits < 1:
        raise UserError("recall needs digits >= 1")
    rng = _rng("recall", seed, digits=digits)
    out = []
    for i in range(n):
        name = rng.choice(NAMES)
        things, others = rng.sample(THINGS, 2)
        a, b = _number(rng, digits), _number(rng, digits)
        out.append(
            Problem(
                id=f"recall-{digits}-{seed}-{i}",
                question=f"{name} has {a} {things} and {b} {others}. How many {things} does {name} have?",
                answer=str(a),
                answer_type="integer",
                task="recall",
                difficulty={"digits": digits},
                solution=f"I read the question once more. The answer is {a}.",
            )
        )
    return out


def logic_chains(n: int, *, hops: int = 2, distractors: int = 1, seed: int = 0) -> list[Problem]:
    """`n` ProntoQA-like problems: an entity belongs to a concept, `hops - 1` rules lead from it to further
    made-up concepts, the last of which has or lacks a property; is the entity <property>? (True/False).
    Rules are shuffled; `distractors` extra rules give the opposite property to concepts off the chain."""
    if hops < 1 or distractors < 0:
        raise UserError("logic chains need hops >= 1 and distractors >= 0")
    if hops + distractors > len(CONCEPTS):
        raise UserError(f"logic chains need hops + distractors <= {len(CONCEPTS)}")
    rng = _rng("logic", seed, hops=hops, distractors=distractors)
    out = []
    for i in range(n):
        concepts = rng.sample(CONCEPTS, hops + distractors)
        chain, others = concepts[:hops], concepts[hops:]
        prop, entity = rng.choice(PROPERTIES), rng.choice(ENTITIES)
        has = rng.random() < 0.5
        rules = [f"Every {a} is a {b}." for a, b in zip(chain, chain[1:], strict=False)]
        rules.append(f"Every {chain[-1]} is {'' if has else 'not '}{prop}.")
        rules += [f"Every {o} is {'not ' if has else ''}{prop}." for o in others]
        rng.shuffle(rules)
        facts = " ".join([*rules, f"{entity} is a {chain[0]}."])
        steps = [f"{entity} is a {chain[0]}."]
        steps += [
            f"Every {a} is a {b}, so {entity} is a {b}." for a, b in zip(chain, chain[1:], strict=False)
        ]
        neg = "" if has else "not "
        steps.append(f"Every {chain[-1]} is {neg}{prop}, so {entity} is {neg}{prop}.")
        out.append(
            Problem(
                id=f"logic-{hops}-{seed}-{i}",
                question=f"{facts} True or false: {entity} is {prop}.",
                answer="True" if has else "False",
                answer_type="boolean",
                task="logic",
                choices=("True", "False"),
                difficulty={"hops": hops, "distractors": distractors},
                solution=" ".join([*steps, f"The answer is {'True' if has else 'False'}."]),
            )
        )
    return out


def load_jsonl(path: str | Path, *, limit: int | None = None) -> list[Problem]:
    """Problems from a JSONL file of `{"question", "answer"}` objects (optional "choices": a list).

    The answer type is inferred from the whole file: all answers integers -> integer; all true/false ->
    boolean; a small set of distinct answers (or explicit choices) -> choice; else text."""
    from maskscope.files import read_text

    path = Path(path)
    rows: list[tuple[str, str, list[str] | None]] = []
    for lineno, line in enumerate(read_text(path, "task file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "question" not in obj or "answer" not in obj:
            raise UserError(f"{path}:{lineno}: each line must be an object with 'question' and 'answer'")
        choices = obj.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise UserError(f"{path}:{lineno}: 'choices' must be a list of strings")
        rows.append((str(obj["question"]), str(obj["answer"]).strip(), choices))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: no problems in the file")
    answers = [a for _, a, _ in rows]
    kind: AnswerType
    shared: tuple[str, ...] | None = None
    if all(re.fullmatch(r"-?\d+", a.replace(",", "")) for a in answers):
        kind = "integer"
    elif all(a.lower() in ("true", "false") for a in answers):
        kind, shared = "boolean", ("True", "False")
    elif any(c is not None for _, _, c in rows) or len(set(answers)) <= MAX_CHOICES < len(answers):
        kind = "choice"
        shared = tuple(sorted(set(answers)))
    else:
        kind = "text"
    out = []
    for i, (question, answer, choices) in enumerate(rows):
        if kind == "integer":
            answer = str(int(answer.replace(",", "")))
        elif kind == "boolean":
            answer = answer.capitalize()
        own = tuple(choices) if choices is not None else shared
        if kind == "choice" and own is not None and answer not in own:
            raise UserError(f"{path}: problem {i + 1}: answer {answer!r} is not one of its choices")
        out.append(
            Problem(
                id=f"{path.stem}-{i}",
                question=question,
                answer=answer,
                answer_type=kind,
                task=path.stem,
                choices=own if kind in ("boolean", "choice") else None,
            )
        )
    return out


class TaskSpec(BaseModel):
    """A task set in a spec: a generator and its difficulty knob, or a JSONL file."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"path": "file"}  # relative to the spec file (resolve_paths)
    kind: Literal["addition", "word", "logic", "recall", "jsonl"] = Field(
        description="Which generator, or a JSONL file."
    )
    name: str | None = Field(None, description="Label in tables and plots (default: kind and difficulty).")
    n: int = Field(10, ge=1, le=10_000, description="How many problems (for jsonl: at most this many).")
    seed: int = Field(0, description="Seed of the generator: the same seed gives the same problems.")
    operands: int = Field(2, ge=2, le=20, description="addition: how many numbers are summed.")
    digits: int = Field(2, ge=1, le=12, description="addition, word and recall: digits of each number.")
    hops: int = Field(2, ge=1, le=12, description="logic: rules chained from the entity to the property.")
    distractors: int = Field(1, ge=0, le=6, description="logic: rules about concepts off the chain.")
    path: str | None = Field(None, description="jsonl: the file of {question, answer} lines.")
    shots: int = Field(
        2,
        ge=0,
        le=8,
        description="Worked examples put before each question as earlier turns: problems of the same kind and "
        "difficulty from another seed (jsonl: the file's first lines, then not asked).",
    )

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> TaskSpec:
        if self.kind == "jsonl" and not self.path:
            raise ValueError("a jsonl task needs a 'path'")
        if self.kind != "jsonl" and self.path:
            raise ValueError(f"'path' is only for jsonl tasks, not {self.kind}")
        return self

    def label(self) -> str:
        """The task set's label."""
        if self.name:
            return self.name
        if self.kind == "addition":
            return f"addition {self.operands}x{self.digits}d"
        if self.kind == "word":
            return f"word {self.digits}d"
        if self.kind == "logic":
            return f"logic {self.hops}-hop"
        if self.kind == "recall":
            return f"recall {self.digits}d"
        return Path(self.path or "").stem

    def _generate(self, n: int, seed: int) -> list[Problem]:
        if self.kind == "addition":
            return addition(n, operands=self.operands, digits=self.digits, seed=seed)
        if self.kind == "word":
            return word_problems(n, digits=self.digits, seed=seed)
        if self.kind == "logic":
            return logic_chains(n, hops=self.hops, distractors=self.distractors, seed=seed)
        if self.kind == "recall":
            return recall(n, digits=self.digits, seed=seed)
        return load_jsonl(self.path or "", limit=n + self.shots)

    def problems(self) -> list[Problem]:
        """Generate (or load) the problems that are asked."""
        if self.kind == "jsonl":
            return self._generate(self.n, self.seed)[self.shots :]
        return self._generate(self.n, self.seed)

    def exemplars(self) -> list[Problem]:
        """The worked examples shown before each question (generated from a different seed)."""
        if self.shots == 0:
            return []
        if self.kind == "jsonl":
            return self._generate(self.n, self.seed)[: self.shots]
        asked = {p.question for p in self.problems()}
        pool = self._generate(self.shots + 20, self.seed + EXEMPLAR_SEED_OFFSET)
        return [p for p in pool if p.question not in asked][: self.shots]


@dataclass(frozen=True)
class TaskSet:
    """A labelled set of problems and the worked examples shown before each."""

    label: str
    problems: list[Problem]
    exemplars: list[Problem]


def load_tasks(specs: Sequence[TaskSpec]) -> list[TaskSet]:
    """The task set of each spec; labels must be unique."""
    out = [TaskSet(t.label(), t.problems(), t.exemplars()) for t in specs]
    labels = [t.label for t in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserError(f"task labels must be unique (give a 'name'); repeated: {', '.join(dup)}")
    return out


# ------------------------------------------------------------------------------- answer formats
def answer_format(problem: Problem) -> str:
    """How the final answer should be written, for the instructions: no placeholder (such as "The answer is
    N.") that a model could copy as its answer."""
    if problem.answer_type == "integer":
        return 'a sentence that begins "The answer is" and ends with the number'
    if problem.answer_type == "boolean":
        return '"The answer is True." or "The answer is False."'
    if problem.answer_type == "choice" and problem.choices:
        return 'a sentence that begins "The answer is" and ends with one of ' + ", ".join(problem.choices)
    return 'a sentence that begins "The answer is" and ends with the answer'


def cot_prompt(problem: Problem) -> str:
    """The user turn asking for step-by-step reasoning, then the answer in the fixed format."""
    return f"{problem.question}\nThink step by step, then give the final answer as {answer_format(problem)}"


def direct_prompt(problem: Problem) -> str:
    """The user turn asking for the answer alone."""
    return f"{problem.question}\nGive only the final answer, as {answer_format(problem)}"


def turns(
    problem: Problem, exemplars: Sequence[Problem] = (), *, style: Literal["cot", "direct"] = "cot"
) -> list[Message]:
    """Each worked example as a user turn and the assistant's reply (its solution for "cot", the bare answer
    for "direct"), then the problem as the last user turn."""
    ask = cot_prompt if style == "cot" else direct_prompt
    messages: list[Message] = []
    for ex in exemplars:
        reply = ex.solution if style == "cot" and ex.solution else f"The answer is {ex.answer}."
        messages += [Message("user", ask(ex)), Message("assistant", reply)]
    messages.append(Message("user", ask(problem)))
    return messages


def conversation(
    problem: Problem,
    exemplars: Sequence[Problem] = (),
    *,
    system: str | None = None,
    style: Literal["cot", "direct"] = "cot",
    prefill: str = "",
) -> Conversation:
    """The chat for a problem: an optional system prompt, then `turns` (worked examples and the problem)."""
    head = [Message("system", system)] if system is not None else []
    return Conversation(tuple(head + turns(problem, exemplars, style=style)), prefill)


ANSWER_MARKER = re.compile(r"answer\s+is\b\s*[:=]?\s*", re.IGNORECASE)
_INT = re.compile(r"-?\d[\d,]*")
_BOOL = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower case, surrounding punctuation and spaces removed: how free-text answers are compared."""
    return re.sub(r"\s+", " ", text.strip().strip(".,;:!?\"'*` ").lower())


def _parse(text: str, problem: Problem, last: bool) -> str | None:
    if problem.answer_type == "integer":
        found = [m.group().rstrip(",").replace(",", "") for m in _INT.finditer(text)]
        found = [f for f in found if f not in ("", "-")]
        return str(int(found[-1] if last else found[0])) if found else None
    if problem.answer_type == "boolean":
        words = [m.group().lower() for m in _BOOL.finditer(text)]
        if not words:
            return None
        word = words[-1] if last else words[0]
        return "True" if word in ("true", "yes") else "False"
    if problem.answer_type == "choice" and problem.choices:
        pattern = "|".join(re.escape(c) for c in sorted(problem.choices, key=len, reverse=True))
        hits = [m.group() for m in re.finditer(rf"(?<!\w)({pattern})(?!\w)", text, re.IGNORECASE)]
        if not hits:
            return None
        hit = (hits[-1] if last else hits[0]).lower()
        return next(c for c in problem.choices if c.lower() == hit)
    if last:
        return None
    sentence = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    return normalize(sentence) or None


def parse_answer(text: str, problem: Problem) -> str | None:
    """The first answer of the problem's type in a text (what follows a forced "The answer is")."""
    return _parse(text, problem, last=False)


def extract_answer(text: str, problem: Problem) -> tuple[str | None, str]:
    """The answer a free text gives, and how it was found.

    "marker": parsed from the rest of the line after the last "answer is" (the format the prompt asks for),
    else after the one before it, and so on; "fallback": no parsable marker, so the last number /
    True-False word / choice in the whole text; "none": nothing."""
    markers = list(ANSWER_MARKER.finditer(text))
    for m in reversed(markers):
        found = _parse(text[m.end() :].split("\n", 1)[0], problem, last=False)
        if found is not None:
            return found, "marker"
    found = _parse(text, problem, last=True)
    return (found, "fallback") if found is not None else (None, "none")


def is_correct(answer: str | None, problem: Problem) -> bool:
    """Whether an extracted answer equals the problem's answer (text answers compared normalized)."""
    if answer is None:
        return False
    if problem.answer_type == "text":
        return normalize(answer) == normalize(problem.answer)
    return answer == problem.answer


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: an integer off by a small non-zero amount, the other boolean, another choice."""
    if problem.answer_type == "integer":
        value = int(problem.answer)
        offsets = [d for d in range(-10, 11) if d != 0 and value + d >= 0]
        return str(value + rng.choice(offsets))
    if problem.answer_type == "boolean":
        return "False" if problem.answer == "True" else "True"
    if problem.answer_type == "choice" and problem.choices and len(problem.choices) > 1:
        return rng.choice([c for c in problem.choices if c != problem.answer])
    raise UserError(f"no wrong answer can be made for a {problem.answer_type} problem ({problem.id})")
