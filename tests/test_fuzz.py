"""Fuzzing the command's input with hypothesis (a fixed, seeded sequence of examples): malformed specs and
command lines end in one line on stderr, exit status 2, no traceback, and nothing written.

Every generated spec names a model that does not exist, and every command line a missing model or store, so
that an input that happens to be valid also ends in one line (the missing model) and nothing loads."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from cli_harness import invoke, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=150,
    derandomize=True,  # the same examples on every run: CI does not turn red at random
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

FIELDS = [
    "experiment", "name", "personas", "pressures", "targets", "in_character", "samples", "max_new_tokens",
    "temperature", "top_p", "seed", "top_k", "examples", "precision", "server", "library", "masks", "tasks",
    "transcript", "switch_rate", "device", "dtype", "batch_tokens", "unknown_field",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "../x", "/etc/passwd", "a" * 300, "$\\alpha^{$", "character", "%", "_"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

BASE: dict[str, Any] = {
    "experiment": "character",
    "name": "fuzz",
    "personas": [{"name": "p", "system": "x"}],
    "pressures": [{"name": "q", "user": "y"}],
    "targets": ["no"],
    "samples": 1,
    "max_new_tokens": 2,
}


@st.composite
def specs(draw: st.DrawFn) -> bytes:
    """A spec file: the base spec with fields changed, removed or added, or raw bytes now and then."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    spec = dict(BASE)
    spec["experiment"] = draw(st.sampled_from(["character", "posterior", "explain", "capabilities", "x"]))
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            spec[field] = draw(values)
        else:
            spec.pop(field, None)
    spec["model"] = "hf:/nonexistent/model"
    text = yaml.safe_dump(spec, allow_unicode=draw(st.booleans()))
    if draw(st.integers(0, 5)) == 0:  # a duplicate key
        text += f"{draw(st.sampled_from(sorted(spec)))}: 1\n"
    return text.encode("utf-8", "surrogatepass")


def _check(args: list[str], work: Path) -> None:
    before = tree(work)
    outcome = invoke(args, cwd=work)
    assert outcome.traceback is None, outcome.traceback
    assert outcome.one_line_error(), (args, outcome.code, outcome.stderr)
    assert tree(work) == before, (args, tree(work) - before)


@SETTINGS
@given(specs())
def test_malformed_specs_are_one_line_and_write_nothing(spec: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "spec.yaml").write_bytes(spec)
        _check(["run", "spec.yaml", "--out", "out"], work)


numbers = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: "nan" if math.isnan(x) else repr(x)),
    st.sampled_from(["", "x", "-", "--", "1e999", "-0", "0x10", "\x00"]),
)
OPTIONS = [
    "--top-k",
    "-n",
    "--temperature",
    "--top-p",
    "--max-new-tokens",
    "--seed",
    "--concurrency",
    "--precision",
]


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """A command line of `score`, `sample`, `run` or `cache` with random options and values."""
    command = draw(
        st.sampled_from(["score", "sample", "run", "cache why", "cache runs", "cache check", "nope"])
    )
    args = command.split()
    positional = draw(st.lists(st.text(max_size=12).filter(lambda s: not s.startswith("-")), max_size=3))
    args += positional
    for _ in range(draw(st.integers(0, 4))):
        args += [draw(st.sampled_from(OPTIONS)), draw(numbers)]
    if command in ("score", "sample"):
        args += [
            "--model",
            draw(st.sampled_from(["hf:/nonexistent", "gguf:/etc/passwd", "zz:q", "openai:ftp://x"])),
        ]
    elif command == "cache check":  # a store it can read: a report (exit 0 or 1), not an error
        args += ["--store", draw(st.sampled_from(["missing.sqlite", "."]))]
    elif command.startswith("cache"):
        args += ["--store", draw(st.sampled_from(["missing.sqlite", ".", "garbage.sqlite"]))]
    return args


@SETTINGS
@given(command_lines())
def test_malformed_command_lines_are_one_line_and_write_nothing(args: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "garbage.sqlite").write_bytes(b"\x13garbage" * 500)
        _check(args, work)
