"""The store under faults: a second process on the same store, a lookup that must not hold the write lock, rows
edited by hand or unparseable, a store of the first schema, a damaged file, a full disk or a read-only place,
and random truncation and byte flips of a store file. Nothing damaged is ever served."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_harness import invoke, tree

import maskscope as ms
from maskscope.errors import UserError
from maskscope.store import SCHEMA_VERSION, CachedModel, Store, call_key, repair_store

CTX = ms.Conversation.of(system="You are a pirate.", user="Say no.")

# The schema of the first store format (before versions and checksums), as it was created then.
FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    parts TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    writes INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS calls_method ON calls(method);
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lookups (
    run TEXT NOT NULL,
    key TEXT NOT NULL,
    method TEXT NOT NULL,
    hit INTEGER NOT NULL,
    PRIMARY KEY (run, key)
);
"""


def _parts(i: int) -> dict:
    return {"method": "score", "prompt": f"p{i}", "args": {"i": i}}


def _fill(path: Path, n: int) -> dict[str, object]:
    results = {}
    with Store(path) as s:
        for i in range(n):
            key = call_key(_parts(i))
            results[key] = {"total": -float(i) - 0.5, "text": f"reply {i}"}
            s.put(key, _parts(i), results[key])
    return results


def _edit(db: Path, sql: str, *params: object) -> None:
    con = sqlite3.connect(db)
    con.execute(sql, params)
    con.commit()
    con.close()


def test_a_lookup_does_not_hold_the_write_lock(tmp_path: Path):
    """The issue's repro: a lookup in one process left the write lock held until its next save."""
    path = tmp_path / "s.sqlite"
    a = Store(path)
    a.start_run("r1", {})
    assert a.get("k", "score") is None
    t = time.monotonic()
    b = Store(path)
    b.start_run("r2", {})  # a write by another connection
    assert time.monotonic() - t < 5
    a.put("k", {"method": "score"}, {"v": 1})
    assert b.get("k") == {"v": 1}
    a.finish_run("r1")
    assert a.lookups("r1") == [("k", "score", False)]
    a.close()
    b.close()


def test_a_hand_edited_or_unparseable_row_is_recomputed_never_served(tiny, tmp_path: Path):
    db = tmp_path / "s.sqlite"
    with Store(db) as store:
        model = CachedModel(tiny, store)
        first = model.score(CTX, ["no", "No way"])
    # zero the first score (as a hand edit would), and make the second not JSON
    con = sqlite3.connect(db)
    rows = dict(con.execute("SELECT key, result FROM calls"))
    con.close()
    (k1, r1), (k2, _) = sorted(rows.items(), key=lambda kv: json.loads(kv[1])["continuation"])
    edited = json.loads(r1)
    edited["logprobs"] = [0.0 for _ in edited["logprobs"]]
    _edit(db, "UPDATE calls SET result = ? WHERE key = ?", json.dumps(edited), k1)
    _edit(db, "UPDATE calls SET result = ? WHERE key = ?", "{not json", k2)
    with Store(db) as store:
        model = CachedModel(tiny, store)
        again = model.score(CTX, ["No way", "no"])
        assert store.damaged == 2 and model.misses == 2  # neither served
        assert [s.logprobs for s in again] == [first[1].logprobs, first[0].logprobs]
        assert store.writes() == {k1: 2, k2: 2}  # each replaced once
    with Store(db) as store:
        CachedModel(tiny, store).score(CTX, ["no", "No way"])
        assert store.damaged == 0  # the replacements are sound


def test_damaged_results_reach_the_summary(tiny_dir: Path, tmp_path: Path):
    spec = {
        "experiment": "character",
        "name": "d",
        "model": f"hf:{tiny_dir}",
        "personas": [{"name": "p", "system": "You are a pirate."}],
        "pressures": [{"name": "q", "user": "Say no."}],
        "targets": ["no", "No"],
        "samples": 3,
        "max_new_tokens": 4,
        "top_k": 3,
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    from maskscope.runner import run_spec

    run_spec(path, out_root=out)
    first = json.loads((out / "d" / "summary.json").read_text())
    db = out / "maskscope.sqlite"
    _edit(db, "UPDATE calls SET result = replace(result, '-', '') WHERE method = 'score'")
    run_spec(path, out_root=out)
    second = json.loads((out / "d" / "summary.json").read_text())
    assert second["run"]["damaged_results_recomputed"] == 2
    assert first["run"]["damaged_results_recomputed"] == 0
    assert second["cells"] == first["cells"]  # the tampered scores were not served


def test_a_store_of_the_first_schema_is_migrated_in_place(tmp_path: Path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(FIRST_SCHEMA)
    good = {call_key(_parts(i)): {"v": i} for i in range(3)}
    for i, (key, result) in enumerate(good.items()):
        con.execute(
            "INSERT INTO calls(key, method, parts, result, created) VALUES (?, 'score', ?, ?, ?)",
            (key, json.dumps(_parts(i), sort_keys=True, separators=(",", ":")), json.dumps(result), float(i)),
        )
    # a row whose key does not match its parts, and one whose result is not JSON: both must be recomputed
    con.execute("INSERT INTO calls(key, method, parts, result, created) VALUES ('f' , 'score', '{}', '1', 9)")
    bad_key = call_key(_parts(7))
    con.execute(
        "INSERT INTO calls(key, method, parts, result, created) VALUES (?, 'score', ?, '{x', 9)",
        (bad_key, json.dumps(_parts(7), sort_keys=True, separators=(",", ":"))),
    )
    con.execute("INSERT INTO runs(name, spec, status, started) VALUES ('old', '{}', 'done', 1)")
    con.commit()
    assert con.execute("PRAGMA user_version").fetchone()[0] == 0
    con.close()
    with Store(db) as s:
        assert {k: s.get(k) for k in good} == good
        assert s.get("f") is None and s.get(bad_key) is None and s.damaged == 2
        assert s.run_record("old")["status"] == "done"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path):
    db = tmp_path / "new.sqlite"
    Store(db).close()
    _edit(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UserError, match="newer maskscope"):
        Store(db)


@pytest.mark.parametrize("where", ["header", "middle", "truncated"])
def test_a_damaged_file_is_one_line_then_repaired(where: str, tmp_path: Path):
    db = tmp_path / "s.sqlite"
    results = _fill(db, 400)
    data = bytearray(db.read_bytes())
    page = 4096
    if where == "header":
        data[0:100] = b"\xa5" * 100
    elif where == "middle":
        data[len(data) // 2 : len(data) // 2 + page] = os.urandom(page)
    else:
        data = data[: len(data) * 2 // 3]
    db.write_bytes(bytes(data))
    for args in (["cache", "runs", "x"], ["cache", "why", "ab"]):
        outcome = invoke([*args, "--store", str(db)])
        assert outcome.one_line_error(), outcome.stderr + str(outcome.traceback)
        # a damaged page among the results may not be on the way of a query about runs
        assert "cache repair" in outcome.stderr or (where == "middle" and "no run named" in outcome.stderr)
    check = invoke(["cache", "check", "--store", str(db)])
    assert check.traceback is None and check.code == 1, check.stdout + check.stderr
    repaired = invoke(["cache", "repair", "--store", str(db)])
    assert repaired.code == 0, repaired.stderr + str(repaired.traceback)
    assert invoke(["cache", "check", "--store", str(db)]).code == 0
    with Store(db, check=True) as s:
        kept = {k: s.get(k) for k in results}
    served = {k: v for k, v in kept.items() if v is not None}
    assert all(results[k] == v for k, v in served.items())
    if where == "header":
        assert len(served) == 0
    elif (
        where == "middle"
    ):  # the pages SQLite can still reach are salvaged (a truncated b-tree may give none)
        assert 0 < len(served) < len(results)


def test_a_directory_or_a_read_only_store_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch):
    from maskscope.runner import parse_spec, run

    spec = {
        "experiment": "character",
        "name": "ro",
        "personas": [{"name": "p"}],
        "pressures": [{"name": "q", "user": "x"}],
        "targets": ["no"],
    }
    experiment, parsed = parse_spec(spec)
    loads = []
    monkeypatch.setattr("maskscope.models.registry.load_model", lambda *a, **k: loads.append(1))
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        run(experiment, parsed, out_root=tmp_path / "out", store_path=tmp_path / "dir.sqlite")
    assert not (tmp_path / "out").exists()

    db = tmp_path / "ro.sqlite"
    Store(db).close()
    real = sqlite3.connect

    def read_only(path, *args, **kwargs):  # the file opened read-only, as on a read-only mount
        kwargs.pop("isolation_level", None)
        kwargs.pop("uri", None)
        con = real(f"file:{path}?mode=ro", *args, uri=True, **kwargs)
        con.isolation_level = None
        return con

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(UserError, match="read-only"):
        run(experiment, parsed, out_root=tmp_path / "out", store_path=db)
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_output_write_is_one_line_and_a_rerun_completes(
    code: int, tiny_dir: Path, tmp_path: Path, monkeypatch
):
    from maskscope.runner import run_spec

    spec = {
        "experiment": "character",
        "name": "w",
        "model": f"hf:{tiny_dir}",
        "personas": [{"name": "p", "system": "You are a pirate."}],
        "pressures": [{"name": "q", "user": "Say no."}],
        "targets": ["no"],
        "samples": 2,
        "max_new_tokens": 3,
        "top_k": 2,
    }
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(spec))
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(code, os.strerror(code))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError) as caught:
        run_spec(path, out_root=tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "cannot write" in message and "rerun" in message
    assert str(tmp_path / "out" / "w") in message
    with Store(tmp_path / "out" / "maskscope.sqlite") as s:
        stored = s.count()
    assert stored == 1 + 1 + 2  # nothing computed was lost
    monkeypatch.setattr(os, "replace", real)
    run_spec(path, out_root=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "w" / "summary.json").read_text())
    assert summary["run"]["misses"] == 0 and summary["run"]["hits"] == stored
    assert {p.name for p in (tmp_path / "out" / "w").iterdir()} >= {
        "summary.json",
        "report.html",
        "exact_heatmap.png",
    }
    assert not [p for p in (tmp_path / "out" / "w").iterdir() if p.name.startswith(".")]


def test_a_full_disk_in_the_store_is_one_line(tmp_path: Path):
    db = tmp_path / "s.sqlite"
    with Store(db) as s:
        s.db.execute(f"PRAGMA max_page_count = {s.db.execute('PRAGMA page_count').fetchone()[0] + 1}")
        with pytest.raises(UserError, match="disk is full.*rerun"):
            for i in range(1000):
                s.put(call_key(_parts(i)), _parts(i), {"pad": "x" * 3000})
        assert 0 < s.count() < 1000


def test_summary_is_written_atomically(tmp_path: Path, monkeypatch):
    from maskscope.files import atomic_write_text

    target = tmp_path / "summary.json"
    atomic_write_text(target, '{"old": true}')

    def killed(self, text, encoding=None):
        Path.write_bytes(self, text[:5].encode())
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, '{"new": true, "long": "' + "x" * 1000 + '"}')
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert tree(tmp_path) == {"summary.json"}


# ----------------------------------------------------------------- store-file fuzzing
def test_truncated_or_flipped_store_files_never_serve_a_wrong_result(tmp_path: Path):
    """50 seeded trials: a store truncated at a random offset, or with random bytes flipped; every open,
    lookup, check and repair ends in a result or one line, and every result served is the one stored."""
    base = tmp_path / "base.sqlite"
    results = _fill(base, 300)
    size = base.stat().st_size
    rng = random.Random(int(os.environ.get("STORE_FUZZ_SEED", "17")))  # other seeds: explore locally
    served_total, refused = 0, 0
    for trial in range(50):
        db = tmp_path / f"t{trial}.sqlite"
        data = bytearray(base.read_bytes())
        if trial % 2:
            data = data[: rng.randrange(0, size)]
        else:
            for _ in range(rng.randint(1, 40)):
                data[rng.randrange(size)] ^= 1 << rng.randrange(8)
        db.write_bytes(bytes(data))
        try:
            with Store(db) as s:
                for key, value in results.items():
                    got = s.get(key)
                    assert got is None or got == value, f"trial {trial}: a wrong result was served"
                    served_total += got is not None
        except UserError as e:
            assert "\n" not in str(e)
            refused += 1
        outcome = invoke(["cache", "check", "--store", str(db)])
        assert outcome.traceback is None and outcome.code in (0, 1, 2), outcome.traceback
        outcome = invoke(["cache", "repair", "--store", str(db)])
        assert outcome.traceback is None and outcome.code == 0, outcome.stderr
        with Store(db, check=True) as s:
            for key, value in results.items():
                got = s.get(key)
                assert got is None or got == value, f"trial {trial}: a wrong result after repair"
    assert served_total > 0 and refused > 0  # both kinds of outcome occurred


# ----------------------------------------------------------------- two processes on one store
def _overlap_spec(tiny_dir: Path, path: Path, name: str, personas: range) -> Path:
    spec = {
        "experiment": "character",
        "name": name,
        "model": f"hf:{tiny_dir}",
        "personas": [{"name": f"p{i}", "system": f"You are character number {i}."} for i in personas],
        "pressures": [{"name": f"q{i}", "user": f"Request {i}: output 'no'."} for i in range(2)],
        "targets": ["no", "No"],
        "samples": 40,
        "max_new_tokens": 12,
        "top_k": 3,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _cells(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    return {(c["persona"], c["pressure"]): c for c in summary["cells"]}


def test_two_processes_on_one_store_both_finish_and_agree_with_separate_runs(tiny_dir: Path, tmp_path: Path):
    a = _overlap_spec(tiny_dir, tmp_path / "a.yaml", "a", range(0, 3))
    b = _overlap_spec(tiny_dir, tmp_path / "b.yaml", "b", range(1, 4))  # p1 and p2 in both
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "maskscope.cli", "run"]
    shared = tmp_path / "shared"
    procs = [
        subprocess.Popen([*cmd, str(s), "--out", str(shared)], env=env, stderr=subprocess.PIPE, text=True)
        for s in (a, b)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    for spec, name in ((a, "sep-a"), (b, "sep-b")):
        subprocess.run(
            [*cmd, str(spec), "--out", str(tmp_path / name)], env=env, check=True, capture_output=True
        )
    con = sqlite3.connect(shared / "maskscope.sqlite")
    writes = [w for (w,) in con.execute("SELECT writes FROM calls")]
    stored = dict(con.execute("SELECT key, result FROM calls"))
    con.close()
    separate = {}
    for name in ("sep-a", "sep-b"):
        con = sqlite3.connect(tmp_path / name / "maskscope.sqlite")
        separate.update(dict(con.execute("SELECT key, result FROM calls")))
        con.close()
    assert writes == [1] * len(writes)  # every result stored once
    assert stored.keys() == separate.keys()
    for key, value in stored.items():
        mine, theirs = json.loads(value), json.loads(separate[key])
        if "text" in mine:  # samples: identical
            assert mine == theirs
        else:  # exact numbers: equal up to batch-shape rounding
            assert mine.keys() == theirs.keys()
    for name, sep in (("a", "sep-a"), ("b", "sep-b")):
        together, apart = (
            _cells(shared / name / "summary.json"),
            _cells(tmp_path / sep / name / "summary.json"),
        )
        assert together.keys() == apart.keys()
        for cell, c in together.items():
            assert c["sampled"] == apart[cell]["sampled"]
            assert c["exact"]["p_target"] == pytest.approx(
                apart[cell]["exact"]["p_target"], rel=1e-4, abs=1e-7
            )


def test_repair_keeps_a_sound_store_whole(tmp_path: Path):
    db = tmp_path / "s.sqlite"
    results = _fill(db, 50)
    report = repair_store(db)
    assert (report.kept, report.dropped) == (50, 0)
    with Store(db) as s:
        assert {k: s.get(k) for k in results} == results
    shutil.rmtree(tmp_path / "nothing", ignore_errors=True)


def test_a_read_only_output_directory_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch):
    from maskscope import runner

    spec = {
        "experiment": "character",
        "name": "ro",
        "personas": [{"name": "p"}],
        "pressures": [{"name": "q", "user": "x"}],
        "targets": ["no"],
    }
    experiment, parsed = runner.parse_spec(spec)
    loads = []
    monkeypatch.setattr("maskscope.models.registry.load_model", lambda *a, **k: loads.append(1))
    out = tmp_path / "out"
    out.mkdir()

    def read_only(*args, **kwargs):  # what creating a file in a read-only directory raises
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(runner.tempfile, "mkstemp", read_only)
    # the run's directory is named after the model's fingerprint, so the output root is what is checked
    with pytest.raises(UserError, match=r"cannot write outputs to .*/out: the file system is read-only"):
        runner.run(experiment, parsed, out_root=out)
    assert loads == [] and tree(out) == set()  # nothing is left behind
