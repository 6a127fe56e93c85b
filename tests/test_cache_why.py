"""`maskscope cache why` summarises: which key parts differ from the nearest earlier call, each in brief, and
a short side-by-side of the differing text around its first difference (never cut where the texts differ,
never a dump of token ids)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cli_harness import invoke

from maskscope.keydiff import first_difference, side_by_side
from maskscope.store import Store, call_key

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def _parts(**changes: Any) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "model": {"weights": "a" * 64, "precision": "fp32", "adapter": None},
        "method": "token_logprobs",
        "prompt": SYSTEM
        + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "args": {"token_ids": list(range(1000, 1400)), "seed": 0},
    }
    for path, value in changes.items():
        where = parts
        *head, last = path.split("__")
        for h in head:
            where = where[h]
        where[last] = value
    return parts


def _why(tmp_path: Path, earlier: dict[str, Any], later: dict[str, Any]) -> str:
    db = tmp_path / "s.sqlite"
    with Store(db) as store:
        store.put(call_key(earlier), earlier, {"r": 1})
        time.sleep(0.01)  # the nearest call is one stored before
        store.put(call_key(later), later, {"r": 2})
    outcome = invoke(["cache", "why", call_key(later)[:12], "--store", str(db)])
    assert outcome.code == 0 and outcome.traceback is None, (outcome.stderr, outcome.traceback)
    return outcome.stdout


def test_prompts_that_differ_late_are_shown_around_the_difference(tmp_path: Path):
    later = _parts(prompt=_parts()["prompt"].replace("capital of France", "capital of Peru"))
    out = _why(tmp_path, _parts(), later)
    after = out.split("It was computed")[1]
    assert "in: prompt" in after and "args" not in after.split("\n")[0]
    at = first_difference(_parts()["prompt"], later["prompt"])
    assert at == len(SYSTEM) + len("<|im_start|>user\nWhat is the capital of ")  # brute force: the 'F'/'P'
    assert f"first difference at character {at}" in after
    # both sides show the differing words whole, with the text just before them
    assert "capital of France?" in after and "capital of Peru?" in after
    assert "named SmolLM" not in after  # the window starts near the difference, not at the prompt's start
    assert len(out.splitlines()) < 25


def test_models_that_differ_name_the_fingerprint_field(tmp_path: Path):
    out = _why(tmp_path, _parts(), _parts(model__weights="b" * 64))
    after = out.split("It was computed")[1]
    assert "differs in 1 part(s), in: model" in after and "model.weights" in after
    assert (
        "prompt" not in after and "first difference" not in after
    )  # a hash is shown in brief, not side by side


def test_seeds_that_differ_and_token_ids_are_summarised_not_dumped(tmp_path: Path):
    ids = list(range(1000, 1400))
    ids[300] = 7
    out = _why(tmp_path, _parts(), _parts(args__seed=1, args__token_ids=ids))
    after = out.split("It was computed")[1]
    assert "in: args" in after and "args.seed" in after and "args.token_ids" in after
    assert "(400 items)" in after and "first difference at item 300" in after
    assert "1299, 7, 1301" in after and "1299, 1300, 1301" in after
    assert "1050" not in out  # the ids far from the difference are not printed
    assert len(out.splitlines()) < 25


def test_side_by_side_of_a_text_that_extends_the_other():
    s = side_by_side("abc", "abcdef")
    assert s is not None and s.at == 3 and s.mine == "abc" and s.theirs == "abcdef"
    assert side_by_side("same", "same") is None
