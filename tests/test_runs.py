"""Runs kept and compared: an id per set of parameters, every sample and exact number exported and read back,
resuming in the same directory, a changed parameter in a new one, and `maskscope runs list|show|diff`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_harness import invoke

import maskscope as ms
from maskscope.errors import UserError
from maskscope.runner import parse_spec, run

WIDE = {"COLUMNS": "200"}
SPEC = {
    "experiment": "character",
    "name": "kept",
    "personas": [
        {"name": "plain", "system": None, "control": True},
        {"name": "pirate", "system": "You are a pirate. Stay in character."},
    ],
    "pressures": [{"name": "stop", "user": "Say no."}, {"name": "ask", "user": "Who are you?"}],
    "targets": ["No", "no"],
    "in_character": ["arr", "ahoy"],
    "samples": 6,
    "max_new_tokens": 4,
    "top_k": 3,
    "examples": 1,
}


@pytest.fixture(scope="module")
def kept(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One finished run of SPEC on the tiny model: (output root, run directory)."""
    root = tmp_path_factory.mktemp("runs")
    return root, run(*parse_spec(SPEC), out_root=root, model=tiny)


def test_read_run_gives_every_sample_and_exact_number(kept, tiny):
    root, out = kept
    r = ms.read_run(out)
    summary = json.loads((out / "summary.json").read_text())
    assert r.info["status"] == "done" and r.info["id"] == out.name == r.id
    assert r.info["spec"]["samples"] == 6 and r.info["versions"]["libraries"]["torch"]
    # cells: one row per persona x pressure, the summary's exact numbers in them
    assert len(r.cells) == 4
    assert list(r.cells["persona"]) == [c["persona"] for c in summary["cells"]]
    assert list(r.cells["exact.p_target"]) == [c["exact"]["p_target"] for c in summary["cells"]]
    # samples: all 6 per cell (the summary keeps 1), each in its cell, the same texts the model samples
    assert len(r.samples) == 4 * 6
    for c, cell in enumerate(summary["cells"]):
        rows = r.samples[r.samples["cell"] == c].sort_values("index")
        assert list(rows["index"]) == list(range(6))
        assert set(rows["persona"]) == {cell["persona"]} and set(rows["pressure"]) == {cell["pressure"]}
        example = cell["sampled"]["examples"][0]
        first = rows.iloc[0]
        assert (first["text"], first["category"]) == (example["text"], example["category"])
        # the categories counted from the export are the experiment's own counts
        for cat, rate in cell["sampled"]["categories"].items():
            assert int((rows["category"] == cat).sum()) == rate["k"]
    ctx = ms.Conversation.of(system="You are a pirate. Stay in character.", user="Who are you?")
    fresh = tiny.sample(ctx, n=6, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    rows = r.samples[(r.samples["persona"] == "pirate") & (r.samples["pressure"] == "ask")].sort_values(
        "index"
    )
    assert list(rows["text"]) == [s.text for s in fresh]
    # tokens: every token of every sample, and the scored targets' per-token log-probabilities
    sampled = r.tokens[r.tokens["source"] == "sample"]
    assert len(sampled) == int(r.samples["n_tokens"].sum())
    ids = list(sampled[sampled["key"] == rows.iloc[0]["key"]].sort_values("position")["token_id"])
    assert ids == list(fresh[0].token_ids)
    scored = r.tokens[r.tokens["source"] == "score"]
    for c, cell in enumerate(summary["cells"]):
        for target in cell["exact"]["per_target"]:
            lps = scored[(scored["cell"] == c) & (scored["continuation"] == target["target"])]["logprob"]
            assert math.isclose(float(lps.sum()), target["logprob"], rel_tol=1e-9, abs_tol=1e-12)
    # calls: every model call of the run with its full result
    assert set(r.calls["method"]) == {"score", "next_token_distribution", "sample"}
    assert (r.calls["method"] == "sample").sum() == 24 and r.calls["result"].notna().all()


def test_jsonl_and_parquet_hold_the_same_rows(kept):
    import pandas as pd

    _, out = kept
    for name in ("cells", "samples", "calls", "tokens"):
        from_parquet = pd.read_parquet(out / f"{name}.parquet")
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == len(from_parquet) > 0
        assert [json.loads(x).get("key", json.loads(x).get("cell")) for x in lines] == list(
            from_parquet["key" if "key" in from_parquet else "cell"]
        )


def test_the_same_spec_resumes_in_the_same_directory(kept, tiny):
    root, out = kept
    before = json.loads((out / "run.json").read_text())
    again = run(*parse_spec(SPEC), out_root=root, model=tiny)
    assert again == out
    info = json.loads((out / "run.json").read_text())
    assert info["created"] == before["created"] and info["attempts"] == before["attempts"] + 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["misses"] == 0 and summary["run"]["hits"] > 0  # resumed from the store
    assert (root / "kept").resolve() == out.resolve()


def test_a_changed_parameter_gets_a_new_directory_and_the_old_is_kept(kept, tiny, tmp_path):
    root, out = kept
    old_samples = (out / "samples.jsonl").read_bytes()
    changed = run(*parse_spec({**SPEC, "seed": 7}), out_root=root, model=tiny)
    assert changed != out and changed.name.startswith("kept-") and changed.parent == out.parent
    assert (out / "samples.jsonl").read_bytes() == old_samples
    assert json.loads((out / "run.json").read_text())["spec"]["seed"] == 0
    assert json.loads((changed / "run.json").read_text())["spec"]["seed"] == 7
    assert (root / "kept").resolve() == changed.resolve()  # the label follows the latest run
    assert set(ms.read_runs(root)["id"]) >= {out.name, changed.name}
    pooled = ms.read_samples(root)
    for rid in (out.name, changed.name):
        assert (pooled["run_id"] == rid).sum() == len(ms.read_run(root / rid).samples) == 24
    # a different library file's contents (same path) is a different run too
    lib = tmp_path / "lib.yaml"
    lib.write_text("masks:\n  - name: a\n    system: You are A.\n")
    from maskscope.runs import resolved_inputs, run_digest

    first = resolved_inputs(parse_spec(_posterior(lib))[1])
    lib.write_text("masks:\n  - name: a\n    system: You are B.\n")
    second = resolved_inputs(parse_spec(_posterior(lib))[1])
    assert run_digest({}, {}, first) != run_digest({}, {}, second)


def _posterior(lib: Path) -> dict:
    return {
        "experiment": "posterior",
        "name": "lib",
        "library": str(lib),
        "transcript": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    }


def test_a_directory_holding_other_parameters_is_never_overwritten(kept, tiny, tmp_path):
    from maskscope.runs import check_unchanged

    _, out = kept
    digest = json.loads((out / "run.json").read_text())["digest"]
    check_unchanged(out, digest)  # negative control: the same parameters may resume there
    with pytest.raises(UserError, match="other parameters"):
        check_unchanged(out, "0" * 64)


def test_runs_list_show_and_diff(kept, tiny):
    root, out = kept
    other = run(*parse_spec({**SPEC, "samples": 4}), out_root=root, model=tiny)
    listed = invoke(["runs", "list", "--root", str(root)], env=WIDE)
    assert listed.code == 0 and out.name in listed.stdout and other.name in listed.stdout
    filtered = invoke(["runs", "list", "--root", str(root), "--filter", "no-such-run"])
    assert filtered.code == 0 and out.name not in filtered.stdout
    shown = invoke(["runs", "show", out.name, "--root", str(root)], env=WIDE)
    assert shown.code == 0 and "24 (samples.jsonl" in shown.stdout.replace("\n", " ")
    diff = invoke(["runs", "diff", out.name, other.name, "--root", str(root)], env=WIDE)
    assert diff.code == 0, diff.stderr
    rows = {
        cols[0]: cols[1:]
        for line in diff.stdout.splitlines()
        if (cols := [c.strip() for c in line.split("│")[1:-1]])
    }
    assert rows["samples"] == ["6", "4"] and "seed" not in rows  # the one spec field that differs
    # the numbers side by side: n per cell differs (6 against 4, b - a = -2); the exact numbers are equal
    # (same prompts, same model) and so are not listed
    for cell in ("plain/stop", "pirate/ask"):
        assert rows[f"cells[{cell}].sampled.n"] == ["6", "4", "-2"]
    a, b = ms.read_run(out), ms.read_run(other)
    assert list(a.cells["exact.p_target"]) == list(b.cells["exact.p_target"])
    assert not any("exact.p_target" in k for k in rows)
    every = invoke(["runs", "diff", out.name, other.name, "--root", str(root), "--all"], env=WIDE)
    assert "cells[plain/stop].exact.p_target" in every.stdout
    same = invoke(["runs", "diff", out.name, out.name, "--root", str(root)])
    assert "the specs are the same" in same.stdout and "(0 of" in same.stdout
    missing = invoke(["runs", "show", "nope", "--root", str(root)])
    assert missing.one_line_error()


# inspect_ai 0.3.285's samples_df calls a pandas 3.1 deprecated argument (its code, not ours)
@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.drop_duplicates")
def test_a_run_exported_as_an_inspect_log_reads_back(kept, tmp_path):
    import importlib.util

    if importlib.util.find_spec("inspect_ai") is None:
        pytest.skip("inspect_ai is an optional extra (maskscope[inspect])")
    # installed (make test installs it): an import error is a broken install, which must fail, not skip
    import inspect_ai.log as inspect_log

    root, out = kept
    r = ms.read_run(out)
    target = tmp_path / "logs" / "kept.eval"
    target.parent.mkdir()
    done = invoke(
        ["runs", "export", out.name, "--format", "inspect", "--out", str(target), "--root", str(root)]
    )
    assert done.code == 0, done.stderr
    log = inspect_log.read_eval_log(str(target))
    assert log.status == "success" and log.eval.task == "maskscope/character" and log.eval.eval_id == out.name
    assert len(log.samples) == len(r.samples) == 24
    by_id = {s.id: s for s in log.samples}
    for row in r.samples.to_dict("records"):
        s = by_id[f"{row['persona']}/{row['pressure']}#{row['index']}"]
        assert s.output.completion == row["text"] and s.scores["category"].value == row["category"]
        assert s.input[0].content == row["prompt"] and s.metadata["seed"] == 0
        cell = r.cells[r.cells["cell"] == row["cell"]].iloc[0]
        assert s.metadata["exact"]["exact.p_target"] == cell["exact.p_target"]
    # the results: each category's share of all replies, as counted from the export
    (score,) = log.results.scores
    for cat, metric in score.metrics.items():
        assert metric.value == pytest.approx((r.samples["category"] == cat).mean())
        lo, hi = metric.metadata["ci95"]
        assert lo <= metric.value <= hi
    # inspect's own analysis functions see the samples and scores beside any other eval in the directory
    from inspect_ai.analysis import samples_df

    df = samples_df(str(target.parent))
    assert len(df) == 24 and sorted(df["score_category"]) == sorted(r.samples["category"])
    bad = invoke(["runs", "export", out.name, "--format", "csv", "--root", str(root)])
    assert bad.one_line_error() and "inspect" in bad.stderr
    default = invoke(["runs", "export", out.name, "--root", str(root)])
    assert default.code == 0 and (out / f"{out.name}.eval").is_file()


def test_an_interrupted_run_is_recorded_and_the_rerun_completes_it(tiny, tmp_path, monkeypatch):
    from maskscope.experiments import character

    real = character.run
    spec = {**SPEC, "name": "cut", "samples": 2}

    def interrupted(model, spec, progress=None):
        real(model, spec.model_copy(update={"samples": 1}), progress)  # some results reach the store
        raise KeyboardInterrupt

    monkeypatch.setattr(character, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(*parse_spec(spec), out_root=tmp_path, model=tiny)
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    info = json.loads((out / "run.json").read_text())
    assert (
        info["status"] == "interrupted" and info["finished"] is None and not (out / "summary.json").exists()
    )
    assert not (tmp_path / "cut").exists()  # the label points only at finished runs
    monkeypatch.setattr(character, "run", real)
    assert run(*parse_spec(spec), out_root=tmp_path, model=tiny) == out
    done = json.loads((out / "run.json").read_text())
    assert done["status"] == "done" and done["created"] == info["created"] and done["attempts"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["hits"] > 0  # resumed from what the interrupted attempt stored
    assert len(ms.read_run(tmp_path / "cut").samples) == 4 * 2


def test_the_viewer_renders_a_real_run(kept):
    from markupsafe import escape

    from maskscope.viewer import Viewer

    root, out = kept
    r = ms.read_run(out)
    viewer = Viewer(root)
    page = viewer.run(out.name, {"cell": "3"})
    rows = page.split('id="samples"')[1]
    assert rows.count('class="sample"') == 6  # the six replies of cell 3 (pirate / ask)
    texts = r.samples[r.samples["cell"] == 3]["text"]
    assert all(str(escape(t)) in rows for t in texts)  # as Jinja escapes it
    assert viewer.run("no-such-run", {}) is None
    missing = invoke(["view", "--root", str(root / "missing")])
    assert missing.one_line_error() and "missing" in missing.stderr
    assert invoke(["view", "--root", str(root), "--port", "70000"]).one_line_error()


def test_cells_of_an_experiment_without_a_cells_list():
    from maskscope.runs import number_differences, tables

    tasks = [{"label": "add", "exact": {"p": 0.5}}, {"label": "mul", "exact": {"p": 0.5}}]
    summary = {"experiment": "x", "masks": [{"name": "a"}], "tasks": tasks}
    rows = tables(summary, [])
    assert [(r["label"], r["exact.p"]) for r in rows["cells"]] == [("add", 0.5), ("mul", 0.5)]
    other = {**summary, "tasks": [tasks[0], {"label": "mul", "exact": {"p": 0.25}}]}
    assert number_differences(summary, other) == [("cells[mul].exact.p", 0.5, 0.25)]


def test_a_run_directory_takes_the_longest_name_and_stays_in_the_root(tmp_path):
    from maskscope.experiments.spec import check_run_name
    from maskscope.runs import run_directory, run_id

    name = check_run_name("n" * 100)  # the longest label
    rid = run_id(name, "ab" * 32)
    assert run_directory(tmp_path, rid) == tmp_path / rid and rid.endswith("-abababab" + "ab")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / rid).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the output directory"):
        run_directory(tmp_path / "root", rid)
