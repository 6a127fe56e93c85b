"""Chain-of-thought surgery at the token level: sentence boundaries, where the answer sentence starts, steps,
cut points, filler of matched length and a mistake in one step."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from maskscope.tasks import ANSWER_MARKER

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia "
    "deserunt mollit anim id est laborum."
)


def slug(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "task"


_END = re.compile(r"(?:[.!?]|\n)\s*$")


def prefix_ends(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """Character length of the decoded text of `ids[:k]`, for k = 0 .. len(ids)."""
    return [len(decode(list(ids[:k]))) for k in range(len(ids) + 1)]


def sentence_cuts(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """Token positions k (0 < k < len) where a sentence ends: the text so far ends with . ! ? or a newline
    (and any spaces), and the next character is a space or newline or the text so far ends with one. Of
    consecutive such positions, the last is kept (the whitespace goes with the sentence before)."""
    text = decode(list(ids))
    ends = prefix_ends(ids, decode)
    marks = []
    for k in range(1, len(ids)):
        head = text[: ends[k]]
        nxt = text[ends[k] : ends[k] + 1]
        if _END.search(head) and (nxt[:1].isspace() or head[-1:].isspace()):
            marks.append(k)
    kept = [k for i, k in enumerate(marks) if i + 1 == len(marks) or marks[i + 1] != k + 1]
    return kept


def answer_start(ids: Sequence[int], decode: Callable[[list[int]], str]) -> int | None:
    """The token position where the sentence holding the first "answer is" begins, or None if there is none.
    Everything before it is the chain of thought."""
    text = decode(list(ids))
    m = ANSWER_MARKER.search(text)
    if m is None:
        return None
    ends = prefix_ends(ids, decode)
    token = max(k for k in range(len(ids) + 1) if ends[k] <= m.start())
    starts = [k for k in sentence_cuts(ids, decode) if k <= token]
    return starts[-1] if starts else 0


def steps(boundaries: Sequence[int], length: int, max_steps: int) -> list[int]:
    """Step ends (token positions, the last is `length`) from sentence boundaries, merging adjacent
    sentences so there are at most `max_steps` steps; merges keep steps near-equal in token count."""
    cuts = sorted({b for b in boundaries if 0 < b < length})
    ends = [*cuts, length] if length > 0 else []
    if len(ends) <= max_steps:
        return ends
    picked = {min(cuts, key=lambda e: abs(e - length * j / max_steps)) for j in range(1, max_steps)}
    return [*sorted(picked), length]


def percent_cuts(length: int, step: int) -> list[tuple[float, int]]:
    """(fraction, token position) for 0, step, 2 step, ..., 100 percent of `length` tokens."""
    fractions = [p / 100 for p in range(0, 101, step)]
    if fractions[-1] != 1.0:
        fractions.append(1.0)
    return [(f, round(f * length)) for f in fractions]


def filler_tokens(unit: Sequence[int], length: int) -> list[int]:
    """`length` tokens of filler: the unit's tokens repeated and cut to length."""
    if not unit:
        raise ValueError("filler must have at least one token")
    reps = length // len(unit) + 1
    return (list(unit) * reps)[:length]


_NUMBER = re.compile(r"\d+")
_NEGATED = re.compile(r"\bis not\b")
_IS = re.compile(r"\bis\b")


def perturb(text: str, rng: random.Random) -> str | None:
    """The text with one error put in: its last number changed by 1 to 9 (up or down, staying >= 0), else
    its last "is not" made "is", else its last "is" made "is not"; None if none of these applies."""
    numbers = list(_NUMBER.finditer(text))
    if numbers:
        m = numbers[-1]
        value = int(m.group())
        offsets = [d for d in range(-9, 10) if d != 0 and value + d >= 0]
        return text[: m.start()] + str(value + rng.choice(offsets)) + text[m.end() :]
    negated = list(_NEGATED.finditer(text))
    if negated:
        m = negated[-1]
        return text[: m.start()] + "is" + text[m.end() :]
    plain = list(_IS.finditer(text))
    if plain:
        m = plain[-1]
        return text[: m.start()] + "is not" + text[m.end() :]
    return None
