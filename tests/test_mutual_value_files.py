"""Malformed game files and bad picture paths through the real entry point (``maskscope.cli.main``): every
one must end with one line on stderr, exit status 2, and nothing written."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mv_games import GAMES, SELL_AND_BUY, TOOLS, copy, random_trees

from maskscope.cli import main


def _run(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``maskscope ARGS`` in ``cwd``; its exit status, stdout and stderr."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with mock.patch.object(sys, "argv", ["maskscope", *args]):
            try:
                main()
                code = 0
            except SystemExit as stop:
                code = int(stop.code or 0)
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def _written(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in {"game.yaml", "game.json"})


# ---------------------------------------------------------------------------------------------------------
# Corruptions, each one certain to make a valid game invalid


def _moves(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(node name, move) for every action and outcome, in file order."""
    out = []
    for name, body in spec["nodes"].items():
        for act in (body.get("actions") or {}).values():
            out.append((name, act))
        for outcome in body.get("outcomes") or []:
            out.append((name, outcome))
    return out


def _numbers(spec: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(mapping, key) of every number in the file whose being non-finite makes the file invalid."""
    places: list[tuple[dict[str, Any], str]] = [(spec, "gamma"), (spec["start"], "x"), (spec["start"], "y")]
    for _, move in _moves(spec):
        if "p" in move:
            places.append((move, "p"))
        for kind in ("add", "set"):
            places.extend((move[kind], k) for k in move.get(kind) or {})
        for kind in ("convert", "produce"):
            items = move.get(kind) or []
            for item in [items] if isinstance(items, dict) else items:
                places.extend((item, k) for k in ("rate", "max") if k in item)
    return places


def _required(spec: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(mapping, key) of every required field."""
    places: list[tuple[dict[str, Any], str]] = [(spec, "name"), (spec, "start"), (spec, "nodes")]
    places.append((spec["start"], "node"))
    for _, move in _moves(spec):
        places.append((move, "to"))
        if "p" in move:
            places.append((move, "p"))
        for kind in ("convert", "produce"):
            items = move.get(kind) or []
            for item in [items] if isinstance(items, dict) else items:
                places.extend((item, k) for k in ("from", "to", "rate"))
    return places


WRONG = st.sampled_from([[1, 2], {"k": 1}, "text", True, None])


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(kind, file bytes, suffix) of a malformed game file."""
    spec = copy(draw(st.one_of(st.just(SELL_AND_BUY), st.just(TOOLS), random_trees())))
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    kind = draw(
        st.sampled_from(
            [
                "wrong-type",
                "unknown-node",
                "cycle",
                "non-finite",
                "huge",
                "missing",
                "extra",
                "non-utf8",
                "truncated",
                "not-a-mapping",
            ]
        )
    )
    if kind == "wrong-type":
        numbers, required = _numbers(spec), _required(spec)
        mapping, key = draw(st.sampled_from(numbers + required))
        value = draw(WRONG)
        if key in {"name", "node", "to", "from"}:
            value = draw(st.sampled_from([[1], {"k": 1}, 3, True, None]))
        refused = (
            any(m is mapping and k == key for m, k in required)
            or mapping is spec["start"]
            or (mapping is spec and key == "gamma")
            or key == "p"
        )
        if value is None and not refused:
            value = "text"  # null is valid in optional fields: add/set amounts, max (no cap)
        if key in {"start", "nodes"} and isinstance(value, dict):
            value = "text"
        mapping[key] = value
    elif kind == "unknown-node":
        where = draw(st.sampled_from([spec["start"], *[m for _, m in _moves(spec)]]))
        where["to" if "to" in where else "node"] = "nowhere"
    elif kind == "cycle":
        node, move = draw(st.sampled_from(_moves(spec)))
        move["to"] = node  # a move back to its own node: a cycle
        spec["structure"] = "tree"
    elif kind == "non-finite":
        mapping, key = draw(st.sampled_from(_numbers(spec)))
        mapping[key] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "huge":
        mapping, key = draw(st.sampled_from([(spec, "gamma"), (spec["start"], "x"), (spec["start"], "y")]))
        mapping[key] = draw(st.sampled_from([1e300, -1e300, 10**400]))
    elif kind == "missing":
        mapping, key = draw(st.sampled_from(_required(spec)))
        del mapping[key]
    elif kind == "extra":
        mapping = draw(st.sampled_from([spec, spec["start"], *[m for _, m in _moves(spec)]]))
        mapping["colour"] = 1
    elif kind == "not-a-mapping":
        spec = draw(st.sampled_from([[1, 2], "text", 3, None]))  # type: ignore[assignment]
    if suffix == ".json":
        text = json.dumps(spec)
    else:
        text = yaml.safe_dump(spec, sort_keys=False)
    if kind == "non-utf8":
        return kind, text.encode("utf-8") + "# café\n".encode("latin-1"), suffix
    if kind == "truncated":
        text = json.dumps(spec)
        return kind, text[: draw(st.integers(1, len(text) - 1))].encode(), ".json"
    return kind, text.encode("utf-8"), suffix


# A game whose start node's second move points back at itself, declared a tree: refused before anything is
# solved.
SELF_LOOP = copy(SELL_AND_BUY)
SELF_LOOP["nodes"]["a"]["actions"]["hold"]["to"] = "a"

FUZZ = settings(
    max_examples=int(os.environ.get("MUTUAL_VALUE_FUZZ_EXAMPLES", "300")),
    derandomize=not os.environ.get("MUTUAL_VALUE_RANDOM"),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(case=corrupted())
@example(case=("cycle", yaml.safe_dump(SELF_LOOP).encode(), ".yaml"))
@example(case=("huge", json.dumps({**SELL_AND_BUY, "gamma": 10**400}).encode(), ".json"))
@example(case=("non-finite", json.dumps({**SELL_AND_BUY, "gamma": math.nan}).encode(), ".json"))
def test_malformed_game_files_give_one_line_and_exit_2(
    case: tuple[str, bytes, str], capsys: pytest.CaptureFixture[str]
) -> None:
    kind, data, suffix = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / f"game{suffix}"
        path.write_bytes(data)
        code, out, err = _run(["mutual-value", str(path), "--out", str(root / "tree.png")], root, capsys)
        assert code == 2, (kind, data[:200], out[-500:], err)
        assert err.count("\n") == 1 and err.startswith("maskscope: error: "), (kind, err)
        assert str(path) in err, (kind, err)
        assert _written(root) == [], kind


# ---------------------------------------------------------------------------------------------------------
# Picture paths


def test_unknown_picture_format_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        ["mutual-value", str(GAMES / "means.yaml"), "--out", str(tmp_path / "x.notanimageformat")],
        tmp_path,
        capsys,
    )
    assert code == 2
    assert err.count("\n") == 1 and ".notanimageformat" in err and ".png" in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []


def test_picture_path_without_suffix_gets_png_and_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "picture"
    code, out, _ = _run(["mutual-value", str(GAMES / "means.yaml"), "--out", str(target)], tmp_path, capsys)
    assert code == 0
    written = tmp_path / "picture.png"
    assert written.read_bytes()[:4] == b"\x89PNG"
    assert not target.exists()
    assert out.rstrip().splitlines()[-1] == f"picture: {written}"


def test_picture_path_that_is_a_directory_gets_the_game_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["mutual-value", str(GAMES / "means.yaml"), "--out", str(tmp_path)], tmp_path, capsys)
    assert code == 0
    written = tmp_path / "means.png"
    assert written.read_bytes()[:4] == b"\x89PNG"
    assert out.rstrip().splitlines()[-1] == f"picture: {written}"


def test_command_reports_definition_ties_and_fixed_points(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sell.json"
    path.write_text(json.dumps(SELL_AND_BUY), encoding="utf-8")
    code, out, _ = _run(["mutual-value", str(path), "--out", str(tmp_path / "t.svg")], tmp_path, capsys)
    assert code == 0
    assert (tmp_path / "t.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert "intrinsic" in out and "NOT robust to the tie rule" in out and "distinct fixed point" in out
    code, out, _ = _run(
        ["mutual-value", str(path), "--definition", "literal", "--out", str(tmp_path / "t.png")],
        tmp_path,
        capsys,
    )
    assert code == 0 and "zero" in out


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--ties", "middle"], "tie rule"),
        (["--definition", "other"], "definition"),
        (["--random-orders", "-1"], "random-orders"),
        (["--intrinsic-x", "nan"], "intrinsic"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], needle: str
) -> None:
    code, _, err = _run(["mutual-value", str(GAMES / "means.yaml"), *option], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err
    assert list(tmp_path.iterdir()) == []
