"""Bad input, as a user or a downloaded spec can give it: every case ends in one line on stderr, exit status 2,
no traceback, and nothing written (no output directory, no store, nothing in the model cache)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cli_harness import invoke, tree

BASE = {
    "experiment": "character",
    "name": "bad",
    "model": "default",
    "personas": [{"name": "pirate", "system": "You are a pirate."}],
    "pressures": [{"name": "ask", "user": "Say no."}],
    "targets": ["no"],
    "samples": 1,
    "max_new_tokens": 2,
    "top_k": 2,
}


def _spec(tmp: Path, text: str | bytes | dict, name: str = "s.yaml") -> Path:
    path = tmp / "in" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(text, dict):
        text = yaml.safe_dump(text)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


def _run(tmp: Path, spec: str | bytes | dict, *extra: str) -> list[str]:
    return ["run", str(_spec(tmp, spec)), "--out", str(tmp / "out"), *extra]


def _capabilities_jsonl(tmp: Path) -> list[str]:
    tasks = tmp / "in" / "t.jsonl"
    tasks.parent.mkdir(exist_ok=True)
    tasks.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "\xff\xfe", "answer": "3"}\n')
    spec = {
        "experiment": "capabilities",
        "name": "bad",
        "tasks": [{"kind": "jsonl", "path": str(tasks), "n": 2, "shots": 0}],
        "masks": [{"name": "plain", "control": True}],
    }
    return _run(tmp, spec)


def _posterior_library(tmp: Path) -> list[str]:
    lib = _spec(tmp, b"masks:\n  - name: caf\xe9\n    system: x\n", "lib.yaml")
    spec = {
        "experiment": "posterior",
        "name": "bad",
        "library": str(lib),
        "transcript": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    return _run(tmp, spec)


def _library_beside_cwd_only(tmp: Path) -> list[str]:
    """A library named relative to the spec that exists only relative to the current directory."""
    (tmp / "lib.yaml").write_text("masks:\n  - name: a\n    system: x\n")
    spec = {
        "experiment": "posterior",
        "name": "bad",
        "library": "lib.yaml",
        "transcript": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    return _run(tmp, spec)


def _store(tmp: Path, what: str) -> list[str]:
    store = tmp / "in" / "store.sqlite"
    store.parent.mkdir(exist_ok=True)
    if what == "directory":
        store.mkdir()
    elif what == "garbage":
        store.write_bytes(b"this is not a database" * 300)
    return _run(tmp, BASE, "--store", str(store))


def _cache_store(tmp: Path) -> Path:
    db = tmp / "in" / "c.sqlite"
    db.parent.mkdir(exist_ok=True)
    from maskscope.store import Store

    with Store(db) as s:
        s.put("ab" * 32, {"method": "score", "x": 1}, {"v": 1})
    return db


# id -> function of the test's tmp directory giving the command's arguments
CASES: dict[str, Callable[[Path], list[str]]] = {
    "experiment as a list": lambda t: _run(t, {**BASE, "experiment": ["character"]}),
    "experiment missing": lambda t: _run(t, {k: v for k, v in BASE.items() if k != "experiment"}),
    "spec not a mapping": lambda t: _run(t, "- a\n- b\n"),
    "spec empty": lambda t: _run(t, ""),
    "spec not UTF-8": lambda t: _run(t, yaml.safe_dump(BASE).encode().replace(b"pirate.", b"pir\xe2te.")),
    "spec not YAML": lambda t: _run(t, "experiment: [character\n"),
    "spec missing": lambda t: ["run", str(t / "in" / "none.yaml"), "--out", str(t / "out")],
    "spec path with a line break": lambda t: ["run", "a\x0bb\nc.yaml", "--out", str(t / "out")],
    "mask library not UTF-8": _posterior_library,
    "task file not UTF-8": _capabilities_jsonl,
    "name with a NUL byte": lambda t: _run(t, {**BASE, "name": "a\x00b"}),
    "name of 300 characters": lambda t: _run(t, {**BASE, "name": "n" * 300}),
    "name ../escaped": lambda t: _run(t, {**BASE, "name": "../escaped"}),
    "name absolute": lambda t: _run(t, {**BASE, "name": str(t / "elsewhere" / "evil")}),
    "name empty": lambda t: _run(t, {**BASE, "name": ""}),
    "name a dot": lambda t: _run(t, {**BASE, "name": "."}),
    "name with a slash": lambda t: _run(t, {**BASE, "name": "a/b"}),
    "name a number": lambda t: _run(t, {**BASE, "name": 12}),
    "temperature .inf": lambda t: _run(t, yaml.safe_dump(BASE) + "temperature: .inf\n"),
    "temperature .nan": lambda t: _run(t, yaml.safe_dump(BASE) + "temperature: .nan\n"),
    "duplicate key": lambda t: _run(t, yaml.safe_dump(BASE) + "samples: 3\n"),
    "samples: true": lambda t: _run(t, {**BASE, "samples": True}),
    "samples: 1.5": lambda t: _run(t, {**BASE, "samples": 1.5}),
    "samples: '3'": lambda t: _run(t, {**BASE, "samples": "3"}),
    "control: 'yes'": lambda t: _run(
        t, {**BASE, "personas": [{"name": "p", "system": "x", "control": "yes"}]}
    ),
    "samples negative": lambda t: _run(t, {**BASE, "samples": -1}),
    "unknown field": lambda t: _run(t, {**BASE, "sample": 3}),
    "model gguf:/etc/passwd": lambda t: _run(t, {**BASE, "model": "gguf:/etc/passwd"}),
    "model hf: a missing directory": lambda t: _run(t, {**BASE, "model": f"hf:{t / 'nowhere'}"}),
    "model unknown scheme": lambda t: _run(t, {**BASE, "model": "ftp:x"}),
    "server api_key_env": lambda t: _run(
        t,
        {**BASE, "model": "openai:http://127.0.0.1:9/v1#m", "server": {"api_key_env": "SECRET_DB_PASSWORD"}},
    ),
    "key over plain http to a remote host": lambda t: _run(
        t, {**BASE, "model": "openai:http://example.com/v1#m"}
    ),
    "library relative to the current directory, not the spec": _library_beside_cwd_only,
    "steering vector file missing": lambda t: _run(
        t, {**BASE, "steer": {"vector": "nowhere.safetensors", "layers": [1], "alpha": 1.0}}
    ),
    "--set unknown field": lambda t: _run(t, BASE, "--set", "sample=3"),
    "--set unknown nested field": lambda t: _run(t, BASE, "--set", "personas.0.sytem=x"),
    "--set index past the list": lambda t: _run(t, BASE, "--set", "pressures.5.user=x"),
    "--set index into a value": lambda t: _run(t, BASE, "--set", "samples.0=1"),
    "--set bad value": lambda t: _run(t, BASE, "--set", "samples=many"),
    "--set value not YAML": lambda t: _run(t, BASE, "--set", "targets=[a"),
    "--set without =": lambda t: _run(t, BASE, "--set", "samples"),
    "--set empty path part": lambda t: _run(t, BASE, "--set", "personas..name=x"),
    "--limit 0": lambda t: _run(t, BASE, "--limit", "0"),
    "--threads 0": lambda t: _run(t, BASE, "--threads", "0"),
    "--device tpu": lambda t: _run(t, BASE, "--device", "tpu"),
    "--dtype int8": lambda t: _run(t, BASE, "--dtype", "int8"),
    "--batch-tokens 4": lambda t: _run(t, BASE, "--batch-tokens", "4"),
    "--dtype float32 with precision bf16": lambda t: _run(
        t, {**BASE, "precision": "bf16"}, "--dtype", "float32"
    ),
    "--device on a server model": lambda t: _run(
        t, {**BASE, "model": "openai:http://127.0.0.1:9/v1#m"}, "--device", "cpu"
    ),
    "--model hf:ORG/NAME not in the hub cache": lambda t: _run(t, BASE, "--model", "hf:acme/not-cached"),
    "--store a directory": lambda t: _store(t, "directory"),
    "--store not a database": lambda t: _store(t, "garbage"),
    "score --top-k -1": lambda t: ["score", "hi", "no", "--top-k", "-1"],
    "score no continuation": lambda t: ["score", "hi"],
    "sample --temperature nan": lambda t: ["sample", "hi", "--temperature", "nan"],
    "sample --temperature -1": lambda t: ["sample", "hi", "--temperature", "-1"],
    "sample -n -3": lambda t: ["sample", "hi", "-n", "-3"],
    "sample -n 0": lambda t: ["sample", "hi", "-n", "0"],
    "sample --top-p 0": lambda t: ["sample", "hi", "--top-p", "0"],
    "sample --top-p inf": lambda t: ["sample", "hi", "--top-p", "inf"],
    "sample --max-new-tokens 0": lambda t: ["sample", "hi", "--max-new-tokens", "0"],
    "sample -n x": lambda t: ["sample", "hi", "-n", "x"],
    "sample --model gguf:/etc/passwd": lambda t: ["sample", "hi", "--model", "gguf:/etc/passwd"],
    "unknown command": lambda t: ["frobnicate"],
    "unknown option": lambda t: ["run", "x.yaml", "--bogus"],
    "cache why %": lambda t: ["cache", "why", "%", "--store", str(_cache_store(t))],
    "cache why ___": lambda t: ["cache", "why", "_" * 3, "--store", str(_cache_store(t))],
    "cache why, store missing": lambda t: ["cache", "why", "ab", "--store", str(t / "in" / "no.sqlite")],
    "cache runs, store a directory": lambda t: ["cache", "runs", "x", "--store", str(t)],
    "cache runs, store garbage": lambda t: [
        "cache",
        "runs",
        "x",
        "--store",
        str(_spec(t, b"\x00garbage" * 1000, "g.sqlite")),
    ],
}


# the environment of a case, where it matters
CASE_ENV = {
    "key over plain http to a remote host": {"MASKSCOPE_API_KEY": "k"},
    "--model hf:ORG/NAME not in the hub cache": {"HF_HUB_CACHE": "/nonexistent/hub"},
}


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache with the bundled model's dequantized copy linked in, to see what is added."""
    from maskscope.models.loading import cache_dir

    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    real = cache_dir() / "gguf"
    for d in real.iterdir() if real.is_dir() else []:
        (cache / "gguf" / d.name).symlink_to(d)
    monkeypatch.setenv("MASKSCOPE_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, isolated_cache: Path):
    work = tmp_path / "work"
    work.mkdir()
    args = CASES[case](work)
    before, cache_before = tree(work), tree(isolated_cache)
    outcome = invoke(args, cwd=work, env=CASE_ENV.get(case))
    assert outcome.traceback is None, outcome.traceback
    assert outcome.one_line_error(), (outcome.code, outcome.stderr)
    assert tree(work) == before, "something was written"
    assert tree(isolated_cache) == cache_before, "something was added to the model cache"
    assert not (tmp_path / "escaped").exists()


def test_cache_why_prefixes_are_not_wildcards(tmp_path: Path):
    db = _cache_store(tmp_path)
    found = invoke(["cache", "why", "abab", "--store", str(db)])
    assert found.code == 0 and "ab" * 32 in found.stdout
    for pattern in ("%", "_", "a_a", "ab%"):
        outcome = invoke(["cache", "why", pattern, "--store", str(db)])
        assert outcome.code == 2 and "0 calls match" in outcome.stderr, pattern


def test_the_store_checks_refuse_a_damaged_file_before_reading_it(tmp_path: Path):
    db = tmp_path / "s.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 4000)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db).execute("SELECT * FROM sqlite_master").fetchall()
    outcome = invoke(["cache", "runs", "x", "--store", str(db)])
    assert outcome.one_line_error(), outcome.stderr
    assert "cache repair" in outcome.stderr


# ----------------------------------------------------------------- end to end
def _character(name: str, model: str, **changes: object) -> dict:
    return {**BASE, "name": name, "model": model, **changes}


def test_labels_are_plain_text_in_plots(tiny, tmp_path: Path):
    """A persona named like TeX markup once crashed the plots after every result was computed."""
    from maskscope.runner import parse_spec, run

    spec = _character(
        "tex",
        "default",
        personas=[{"name": "$\\alpha^{$", "system": "x"}, {"name": "a $ b", "system": "y"}],
        pressures=[{"name": "$x_{$", "user": "Say no."}],
    )
    out = run(*parse_spec(spec), out_root=tmp_path, model=tiny)
    assert {"summary.json", "report.html", "exact_heatmap.png", "sampled_categories.png"} <= {
        p.name for p in out.iterdir()
    }


def test_a_hostile_weights_file_is_one_line_runs_nothing_and_leaves_nothing(tiny_dir: Path, tmp_path: Path):
    import shutil

    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what a hostile pickle does when loaded
            import os

            return (os.system, (f"touch {marker}",))

    model_dir = tmp_path / "hostile"
    shutil.copytree(tiny_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": Payload()}, model_dir / "pytorch_model.bin")
    work = tmp_path / "work"
    work.mkdir()
    args = _run(work, _character("hostile", f"hf:{model_dir}"))
    before = tree(work)
    outcome = invoke(args, cwd=work)
    assert outcome.traceback is None, outcome.traceback
    assert outcome.one_line_error() and "cannot load model" in outcome.stderr, outcome.stderr
    assert not marker.exists()
    assert tree(work) == before  # no output directory, no empty store


def test_ctrl_c_during_a_run_exits_130_and_the_rerun_resumes(tiny_dir: Path, tmp_path: Path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    samples = 1500  # enough work that the signal lands mid-run (400 replies took 6 s on an idle machine)
    spec = _spec(tmp_path, _character("intr", f"hf:{tiny_dir}", samples=samples, max_new_tokens=16))
    cmd = [sys.executable, "-m", "maskscope.cli", "run", str(spec), "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # As in a terminal: SIGINT at its default (a shell started in the background, as under nohup or some CI
    # runners, passes SIGINT on as ignored, and Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    db = tmp_path / "out" / "maskscope.sqlite"
    # Progress goes to stderr as plain lines (not a terminal): interrupt once some replies are stored.
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"sampled: replies: (\d+)/", line)
            if m and int(m.group(1)) >= 40:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(timeout=300), "".join(lines)[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert [x for x in err.splitlines() if x.strip()][-1] == "interrupted: rerun the same command to resume"
    con = sqlite3.connect(db)
    kept = con.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    status = con.execute("SELECT status FROM runs WHERE name = 'intr'").fetchone()[0]
    con.close()
    assert kept >= 20 and status == "interrupted"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    summary = json.loads((tmp_path / "out" / "intr" / "summary.json").read_text())
    assert summary["run"]["hits"] == kept and summary["run"]["misses"] == 1 + 1 + samples - kept
