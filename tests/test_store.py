"""The store: results served from it, keys that change when anything that changes the answer changes,
errors never stored, and a run killed half-way resumes with every result computed exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import maskscope as ms
from maskscope.store import CachedModel, Store, call_key

CTX = ms.Conversation.of(system="You are a pirate.", user="Say no.")


def test_second_call_is_served_from_the_store(tiny, tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        model = CachedModel(tiny, store)
        first = model.score(CTX, ["no", "No way"])
        assert (model.hits, model.misses) == (0, 2)
        again = model.score(CTX, ["No way", "no"])
        assert (model.hits, model.misses) == (2, 2)
        assert [s.logprobs for s in again] == [first[1].logprobs, first[0].logprobs]
        s1 = model.sample(CTX, n=3, max_new_tokens=5, seed=1)
        s2 = model.sample(CTX, n=4, max_new_tokens=5, seed=1)  # only index 3 is new
        assert model.misses == 2 + 3 + 1
        assert [s.text for s in s2[:3]] == [s.text for s in s1]
        assert store.count("sample") == 4 and store.count("score") == 2


def test_key_parts_name_what_changed(tiny, tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        model = CachedModel(tiny, store)
        model.sample(CTX, n=1, max_new_tokens=5, seed=1)
        time.sleep(0.01)
        model.sample(CTX, n=1, max_new_tokens=5, seed=2)
        newest = max(store.writes(), key=lambda k: store.parts(k)["args"]["seed"])
        why = store.explain(newest)
        assert why.stored and why.differences == {"args.seed": (2, 1)}
        parts = store.parts(newest)
        assert call_key(parts) == newest
        assert parts["model"]["weights"] == tiny.fingerprint()["weights"]
        assert parts["prompt"] == tiny.render(CTX)


def test_errors_are_never_stored(tiny, tmp_path):
    class Failing:
        def __init__(self, inner):
            self.inner, self.name, self.capabilities = inner, inner.name, inner.capabilities

        def fingerprint(self):
            return self.inner.fingerprint()

        def render(self, context):
            return self.inner.render(context)

        def score_many(self, requests):
            raise RuntimeError("server fell over")
            yield  # pragma: no cover

    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(RuntimeError):
            CachedModel(Failing(tiny), store).score(CTX, ["no"])
        assert store.count() == 0
        assert CachedModel(tiny, store).score(CTX, ["no"])[0].logprobs == tiny.score(CTX, ["no"])[0].logprobs
        assert store.count() == 1


def _spec(tiny_dir: Path, path: Path) -> Path:
    spec = {
        "experiment": "character",
        "name": "resume",
        "model": f"hf:{tiny_dir}",
        "personas": [{"name": f"p{i}", "system": f"You are character number {i}."} for i in range(3)],
        "pressures": [{"name": f"q{i}", "user": f"Request {i}: output 'no'."} for i in range(2)],
        "targets": ["no", "No", "No."],
        "in_character": ["character"],
        "samples": 200,
        "max_new_tokens": 32,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _maskscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskscope.cli", *args]


def _stored(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT key, result FROM calls"))
    finally:
        con.close()


def test_sigkill_half_way_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    spec = _spec(tiny_dir, tmp_path / "resume.yaml")
    total = 6 * 3 + 6 + 6 * 200  # scores + first-token distributions + samples
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    clean = tmp_path / "clean"
    subprocess.run(
        _maskscope("run", str(spec), "--out", str(clean)), check=True, env=env, capture_output=True
    )
    reference = _stored(clean / "maskscope.sqlite")
    assert len(reference) == total

    killed = tmp_path / "killed"
    db = killed / "maskscope.sqlite"
    proc = subprocess.Popen(
        _maskscope("run", str(spec), "--out", str(killed)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                at_kill = len(_stored(db))
            except sqlite3.OperationalError:
                at_kill = 0
            if at_kill >= 6 * 3 + 6 + 100:  # past the exact part, inside the sampling
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = _stored(db)
    assert 0 < len(partial) < total

    subprocess.run(
        _maskscope("run", str(spec), "--out", str(killed)), check=True, env=env, capture_output=True
    )
    resumed = _stored(db)
    assert resumed.keys() == reference.keys()
    con = sqlite3.connect(db)
    writes = [w for (w,) in con.execute("SELECT writes FROM calls")]
    con.close()
    assert writes == [1] * total  # nothing computed twice
    for key, result in partial.items():
        assert resumed[key] == result  # what was there before the kill was kept as it was
    assert resumed == reference  # and the resumed run equals the uninterrupted one
    summary = json.loads((killed / "resume" / "summary.json").read_text())
    assert summary["run"]["hits"] == len(partial)
    assert summary["run"]["misses"] == total - len(partial)


def test_cache_commands_show_the_parts_that_differ(tiny, tmp_path):
    db = tmp_path / "s.sqlite"
    with Store(db) as store:
        model = CachedModel(tiny, store)
        store.start_run("first", {})
        model.sample(CTX, n=1, max_new_tokens=4, seed=1)
        store.finish_run("first")
        time.sleep(0.01)
        store.start_run("second", {})
        model.sample(CTX, n=1, max_new_tokens=4, seed=1, temperature=0.5)
        store.finish_run("second")
        ((key, _, served),) = store.lookups("second")
    assert not served
    runs = subprocess.run(
        _maskscope("cache", "runs", "second", "--store", str(db)), capture_output=True, text=True
    )
    assert runs.returncode == 0 and "0 calls served from the store, 1 computed" in runs.stdout
    assert key[:16] in runs.stdout
    why = subprocess.run(
        _maskscope("cache", "why", key[:10], "--store", str(db)), capture_output=True, text=True
    )
    assert why.returncode == 0, why.stderr
    assert "args.temperature" in why.stdout and "0.5" in why.stdout
    assert "args.seed" not in why.stdout.split("It was computed")[1]
    missing = subprocess.run(
        _maskscope("cache", "why", "ffffffff", "--store", str(db)), capture_output=True, text=True
    )
    assert missing.returncode == 2 and "0 calls match" in missing.stderr
