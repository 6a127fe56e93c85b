"""Why a call was computed rather than served from the store, told briefly: which parts of its key differ from
the nearest earlier call, each difference summarised (a long prompt or a list of token ids is never dumped),
and a short side-by-side of the differing text around the first difference."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Characters shown before and after the first difference of two texts in a side-by-side, and list items
# (token ids) of two lists.
BEFORE, AFTER = 30, 50
BEFORE_ITEMS, AFTER_ITEMS = 5, 6


def brief(value: Any, width: int = 60) -> str:
    """A value in at most about `width` characters: a long string or list says how long it is."""
    if isinstance(value, str):
        text = _escaped(value)
        return text if len(text) <= width else f"{text[: width - 12]}… ({len(value)} chars)"
    if isinstance(value, list) and len(value) > 6:
        head = ", ".join(json.dumps(v, ensure_ascii=False) for v in value[:4])
        return f"[{head}, …] ({len(value)} items)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def _escaped(text: str) -> str:
    """A string on one line, control characters (a newline in a prompt) written as escapes."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first position where two strings or lists differ (the shorter one's length when one extends the
    other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class SideBySide:
    """The two values around their first difference: where it is, and a window of each from the same start."""

    at: int
    mine: str
    theirs: str
    unit: str  # "character" or "item"


def side_by_side(a: str | list[Any], b: str | list[Any]) -> SideBySide | None:
    """Windows of both values that start a little ahead of the first difference (BEFORE characters, or
    BEFORE_ITEMS list items) and run past it (AFTER, AFTER_ITEMS), so the differing text is shown whole rather
    than cut where it begins."""
    at = first_difference(a, b)
    if at is None:
        return None
    before, after = (BEFORE, AFTER) if isinstance(a, str) else (BEFORE_ITEMS, AFTER_ITEMS)
    start = max(0, at - before)

    def window(v: str | list[Any]) -> str:
        part = v[start : at + after]
        text = _escaped(part) if isinstance(v, str) else ", ".join(map(str, part))
        return ("…" if start else "") + text + ("…" if at + after < len(v) else "")

    return SideBySide(at, window(a), window(b), "character" if isinstance(a, str) else "item")


@dataclass
class Difference:
    """One key part that differs: its name, both values in brief, and a side-by-side for long text or lists."""

    part: str
    mine: str
    theirs: str
    detail: SideBySide | None


def differences(diff: dict[str, tuple[Any, Any]]) -> list[Difference]:
    """Each differing part in brief; strings and lists that both sides have get a side-by-side."""
    out = []
    for part, (mine, theirs) in sorted(diff.items()):
        detail = None
        if isinstance(mine, str) and isinstance(theirs, str) and (len(mine) > 70 or len(theirs) > 70):
            detail = side_by_side(mine, theirs)
        elif isinstance(mine, list) and isinstance(theirs, list) and (len(mine) > 6 or len(theirs) > 6):
            detail = side_by_side(mine, theirs)
        width = 40 if detail is not None else 70  # the side-by-side below shows what matters
        out.append(Difference(part, brief(mine, width), brief(theirs, width), detail))
    return out


def groups(parts: list[str]) -> list[str]:
    """The key's parts in which the differences lie (model, method, prompt, args), in that order."""
    order = ["model", "method", "prompt", "args"]
    found = {p.split(".")[0] for p in parts}
    return [g for g in order if g in found] + sorted(found - set(order))


def call_summary(parts: dict[str, Any]) -> list[tuple[str, str]]:
    """A stored call's key in a few lines: method, the model's fingerprint, the prompt and the arguments, each
    in brief."""
    lines = []
    for name in ("method", "model", "prompt", "args"):
        if name not in parts:
            continue
        value = parts[name]
        if isinstance(value, dict):
            text = ", ".join(f"{k}={brief(v, 40)}" for k, v in sorted(value.items()))
        else:
            text = brief(value, 100)
        lines.append((name, text))
    for name in sorted(set(parts) - {"method", "model", "prompt", "args"}):
        lines.append((name, brief(parts[name], 100)))
    return lines
