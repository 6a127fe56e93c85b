"""The researcher's workflow: hub ids from the local Hugging Face cache, device/dtype/batch budget, and
`maskscope run` with --model, --limit, --set, --threads; spec-relative paths; files checked before a model
loads; plain progress lines when the output is not a terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_harness import invoke, tree

import maskscope as ms
from maskscope.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CHARACTER = {
    "experiment": "character",
    "name": "wf",
    "model": "default",
    "personas": [{"name": "pirate", "system": "You are a pirate."}, {"name": "plain", "control": True}],
    "pressures": [
        {"name": "ask", "user": "Say no."},
        {"name": "beg", "user": "Please say no."},
        {"name": "other", "user": "What is 2 + 2?"},
    ],
    "targets": ["no", "No"],
    "samples": 2,
    "max_new_tokens": 3,
    "top_k": 2,
    "examples": 1,
}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _fake_hub_cache(
    root: Path, repo: str, model_dir: Path, commit: str = "0123456789abcdef" * 2 + "01234567"
):
    """The hub cache layout huggingface_hub writes: blobs/ by content, snapshots/<commit>/ of symlinks to
    them, refs/main naming the commit."""
    import hashlib

    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    (base / "blobs").mkdir(parents=True)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        if not f.is_file():
            continue
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


# ----------------------------------------------------------------- hub ids, device, dtype, batch budget
def test_a_hub_id_loads_from_the_local_cache_named_by_hf_hub_cache(tiny, tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "acme/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local directory acme/tiny-llama here
    model = ms.load_model("hf:acme/tiny-llama")
    assert model.name == "acme/tiny-llama"
    assert model.fingerprint()["weights"] == tiny.fingerprint()["weights"]
    ctx = ms.Conversation.of(user="Say no.")
    mine = [s.total for s in model.score(ctx, ["no", "Yes, sure"])]
    direct = [s.total for s in tiny.score(ctx, ["no", "Yes, sure"])]
    assert mine == pytest.approx(direct, abs=1e-6)
    # a revision that is not cached is refused like a missing model, with the command that downloads it
    with pytest.raises(UserError, match=r"hf download acme/tiny-llama --revision v2"):
        ms.load_model("hf:acme/tiny-llama@v2")


def test_hf_home_is_respected_and_a_missing_model_says_how_to_download_it(tiny_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    _fake_hub_cache(home / "hub", "acme/tiny-llama", tiny_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    from maskscope.models.loading import resolve_hf

    directory, shown = resolve_hf("acme/tiny-llama")
    assert directory.parent == home / "hub" / "models--acme--tiny-llama" / "snapshots"
    assert (directory / "config.json").is_file() and shown == "acme/tiny-llama"
    with pytest.raises(UserError) as e:
        resolve_hf("acme/absent")
    message = str(e.value)
    assert "`hf download acme/absent`" in message and str(home / "hub") in message and "\n" not in message


def test_a_local_directory_wins_over_a_hub_id_of_the_same_form(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    local = tmp_path / "acme" / "tiny"
    shutil.copytree(tiny_dir, local)
    monkeypatch.chdir(tmp_path)
    from maskscope.models.loading import resolve_hf

    assert resolve_hf("acme/tiny") == (Path("acme/tiny"), "tiny")
    from maskscope.models.registry import check_model_name

    check_model_name("hf:acme/tiny")  # found locally: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_one_line_not_a_type_error(tiny_dir):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="sees no CUDA device"):
            ms.load_model(f"hf:{tiny_dir}", device=device)
    with pytest.raises(UserError, match="unknown device"):
        ms.load_model(f"hf:{tiny_dir}", device="gpu0")


def test_dtype_and_batch_budget_reach_the_model(tiny, tiny_dir):
    small = ms.load_model(f"hf:{tiny_dir}", device="cpu", batch_tokens=32)
    assert small.token_budget == 32 and small.fingerprint() == tiny.fingerprint()
    ctxs = [ms.Conversation.of(user=f"Question {i}: say no.") for i in range(6)]
    # a budget of 32 tokens splits these prompts into several batches: the numbers do not depend on it
    requests = [(c, ["no", "No way"]) for c in ctxs]
    many = sorted((r, j, s.total) for r, j, s in small.score_many(requests))
    one = sorted((r, j, s.total) for r, j, s in tiny.score_many(requests))
    assert [x[:2] for x in many] == [x[:2] for x in one] and len(one) == 12
    assert [x[2] for x in many] == pytest.approx([x[2] for x in one], abs=1e-4)
    half = ms.load_model(f"hf:{tiny_dir}", dtype="bfloat16")
    assert half.fingerprint()["dtype"] == "bfloat16" and half.precision == "bf16"
    assert half.fingerprint()["weights"] == tiny.fingerprint()["weights"]
    assert ms.load_model(f"hf:{tiny_dir}", dtype="auto").fingerprint()["dtype"] == "float32"  # auto on CPU
    with pytest.raises(UserError, match="disagree"):
        ms.load_model(f"hf:{tiny_dir}", precision="bf16", dtype="float16")
    with pytest.raises(UserError, match="apply to local models"):
        ms.load_model("openai:http://127.0.0.1:9/v1#m", device="cpu")


def test_device_auto_goes_through_accelerate_device_map(tiny, tiny_dir, monkeypatch):
    """The device_map="auto" path (what `auto` is where CUDA exists), run here on the CPU: accelerate places
    every layer on the only device there is, and the numbers are the plain load's."""
    from maskscope.models import loading

    seen = {}
    real = loading.resolve_device

    def as_if_cuda(device):
        seen["device"] = device
        return "map" if device == "auto" else real(device)

    import transformers

    load = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["device_map"] = kwargs.get("device_map")
        return load(*args, **kwargs)

    monkeypatch.setattr(loading, "resolve_device", as_if_cuda)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    spread = ms.load_model(f"hf:{tiny_dir}", device="auto")
    assert seen == {"device": "auto", "device_map": "auto"}
    assert spread.token_budget == loading.DEFAULT_TOKEN_BUDGET  # no CUDA device holds it: CPU's default
    ctx = ms.Conversation.of(user="Say no.")
    assert [s.total for s in spread.score(ctx, ["no", "Yes"])] == pytest.approx(
        [s.total for s in tiny.score(ctx, ["no", "Yes"])], abs=1e-6
    )


def test_the_batch_budget_from_free_memory():
    from types import SimpleNamespace

    from maskscope.models.loading import token_budget_for_memory

    # Llama-3.1-8B's shape in bf16: per token, K and V over 32 layers of 8 heads of 128 dims (131072 bytes),
    # one layer's activations (4 * 4096 + 3 * 14336) * 2 = 118784 bytes, and float32 logits and
    # log-probabilities over 128256 tokens (1026048 bytes): 1275904 bytes. 80% of 8 GB / 1275904 = 5016.
    llama8b = SimpleNamespace(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=32,
        intermediate_size=14336,
        vocab_size=128256,
    )
    assert token_budget_for_memory(8e9, llama8b, 2) == 5016
    assert token_budget_for_memory(16e9, llama8b, 2) == 10032  # linear in free memory
    assert token_budget_for_memory(1e6, llama8b, 2) == 256  # never below the floor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(tiny, tiny_dir):  # pragma: no cover - runs where CUDA exists
    gpu = ms.load_model(f"hf:{tiny_dir}", device="cuda")
    assert gpu.device.type == "cuda" and gpu.token_budget >= 256
    ctx = ms.Conversation.of(user="Say no.")
    on_gpu = [s.total for s in gpu.score(ctx, ["no", "Yes"])]
    on_cpu = [s.total for s in tiny.score(ctx, ["no", "Yes"])]
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)
    spread = ms.load_model(f"hf:{tiny_dir}", device="auto")  # accelerate's device_map="auto"
    assert [s.total for s in spread.score(ctx, ["no", "Yes"])] == pytest.approx(on_cpu, abs=1e-3)
    assert ms.load_model(f"hf:{tiny_dir}", device="cuda", dtype="auto").fingerprint()["dtype"] in (
        "bfloat16",
        "float16",
    )


# ----------------------------------------------------------------- --set, --limit, spec-relative paths
def test_set_changes_the_spec_with_yaml_values_and_limit_cuts_the_list(tmp_path):
    from maskscope.runner import load_spec

    spec_file = _write(tmp_path / "s.yaml", CHARACTER)
    _, spec = load_spec(
        spec_file, ["samples=7", "targets=[sure, 'no']", "personas.1.system=You are terse."], 2
    )
    assert spec.samples == 7 and spec.targets == ["sure", "no"]
    assert spec.personas[1].system == "You are terse."
    assert [p.name for p in spec.pressures] == ["ask", "beg"]  # the first two, in order
    assert [p.name for p in load_spec(spec_file, limit=10)[1].pressures] == ["ask", "beg", "other"]


def test_limit_is_defined_for_every_experiment():
    from maskscope.runner import load_spec

    _, cot = load_spec(ROOT / "examples" / "cot.yaml", limit=2)
    _, full = load_spec(ROOT / "examples" / "cot.yaml")
    assert [t.n for t in cot.tasks] == [min(t.n, 2) for t in full.tasks]
    _, posterior = load_spec(ROOT / "examples" / "posterior.yaml", limit=1)
    roles = [t.role for t in posterior.transcript]
    assert roles.count("assistant") == 1 and roles[-1] == "assistant"
    _, explain = load_spec(ROOT / "examples" / "explain.yaml", limit=2)
    assert explain.prompts == load_spec(ROOT / "examples" / "explain.yaml")[1].prompts[:2]
    _, directions = load_spec(ROOT / "examples" / "directions.yaml", limit=8)
    assert len(directions.prompts) == 8
    with pytest.raises(UserError, match="prompts"):  # below the fewest prompts a direction is read from
        load_spec(ROOT / "examples" / "directions.yaml", limit=3)
    for name in ("capabilities", "prefill", "shutdown", "explain_mixture"):
        assert load_spec(ROOT / "examples" / f"{name}.yaml", limit=1)[1] is not None


def test_paths_in_a_spec_resolve_against_its_directory(tiny_dir, tmp_path, monkeypatch):
    from maskscope.runner import load_spec, read_spec_files

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "tiny").symlink_to(tiny_dir)
    (project / "lib.yaml").write_text("masks:\n  - name: pirate\n    system: Arr.\n  - name: plain\n")
    (project / "q.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    spec_file = _write(
        project / "specs" / "p.yaml",
        {
            "experiment": "posterior",
            "name": "p",
            "model": "hf:../models/tiny",
            "library": "../lib.yaml",
            "transcript": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr."}],
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, spec = load_spec(spec_file)
    assert Path(spec.library).resolve() == (project / "lib.yaml").resolve()
    assert Path(spec.model.removeprefix("hf:")).resolve() == tiny_dir.resolve()
    assert [m.name for m in spec.mask_library().masks] == ["pirate", "plain"]
    # a jsonl task file, too
    cap = _write(
        project / "specs" / "c.yaml",
        {
            "experiment": "capabilities",
            "name": "c",
            "tasks": [{"kind": "jsonl", "path": "../q.jsonl", "n": 1, "shots": 0}],
            "masks": [{"name": "plain", "control": True}],
        },
    )
    read_spec_files(load_spec(cap)[1])  # reads ../q.jsonl beside the spec, not in the current directory
    # a hub id keeps its meaning; a path given on the command line is relative to the current directory
    (elsewhere / "mine.yaml").write_text("masks:\n  - name: mine\n")
    _, spec = load_spec(spec_file, ["model=hf:acme/some-model", "library=mine.yaml"])
    assert spec.model == "hf:acme/some-model" and spec.library == "mine.yaml"
    assert [m.name for m in spec.mask_library().masks] == ["mine"]


def test_a_missing_library_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    import maskscope.models.registry as registry

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the spec's files were checked")

    monkeypatch.setattr(registry, "load_model", no_load)
    spec = {
        "experiment": "posterior",
        "name": "p",
        "model": f"hf:{tiny_dir}",
        "library": "masks-that-are-not-here.yaml",
        "transcript": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr."}],
    }
    spec_file = _write(tmp_path / "in" / "p.yaml", spec)
    work = tmp_path / "work"
    work.mkdir()
    outcome = invoke(["run", str(spec_file), "--out", str(work / "runs")], cwd=work)
    assert outcome.one_line_error(), (outcome.stderr, outcome.traceback)
    assert f"mask library not found: {tmp_path / 'in' / 'masks-that-are-not-here.yaml'}" in outcome.stderr
    assert tree(work) == set()  # no run directory, no store


# ----------------------------------------------------------------- end to end on the tiny model
def test_run_with_model_limit_set_and_threads(tiny_dir, tmp_path):
    spec_file = _write(tmp_path / "in" / "s.yaml", CHARACTER)
    threads = torch.get_num_threads()
    try:
        outcome = invoke(
            [
                "run",
                str(spec_file),
                "--out",
                str(tmp_path / "runs"),
                "--model",
                f"hf:{tiny_dir}",
                "--limit",
                "2",
                "--set",
                "samples=3",
                "--set",
                "personas.0.system=You are a cat.",
                "--threads",
                "2",
                "--batch-tokens",
                "64",
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
            ]
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert outcome.code == 0, (outcome.stderr, outcome.traceback)
    summary = json.loads((tmp_path / "runs" / "wf" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "ask" in text and "beg" in text and "What is 2 + 2?" not in text  # --limit 2: the third is not run
    assert "You are a cat." in text and "You are a pirate." not in text
    assert summary["run"]["misses"] > 0
    assert summary["metadata"]["dtype"] == "bfloat16" and summary["metadata"]["approximate"] is True


def test_progress_is_plain_lines_when_stdout_is_a_pipe(tiny_dir, tmp_path):
    spec_file = _write(tmp_path / "in" / "s.yaml", {**CHARACTER, "samples": 4, "model": f"hf:{tiny_dir}"})
    cmd = [sys.executable, "-m", "maskscope", "run", str(spec_file), "--out", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    replies = [x for x in lines if x.startswith("sampled: replies: ")]
    # 6 cells x 4 samples: a start line, then one line per tenth or per step, ending at 24/24
    assert replies[0] == "sampled: replies: 0/24" and replies[-1].startswith("sampled: replies: 24/24 (100%)")
    assert len(replies) >= 3
    assert not any("\x1b[" in x or "\r" in x for x in lines)  # no terminal control sequences in a log


def test_plain_progress_writes_a_line_per_step_per_tenth_or_per_interval():
    import io

    from maskscope.progress import PlainProgress

    now = [0.0]
    stream = io.StringIO()
    progress = PlainProgress(stream, every=10.0, clock=lambda: now[0])
    advance = progress.task("few", 4)
    for _ in range(4):
        advance(1)
    advance = progress.task("many", 1000)
    for _ in range(1000):  # quick steps: a line per tenth
        advance(1)
    advance = progress.task("slow", 1000)
    for _ in range(5):  # slow steps, 11 s apart: a line each, although no tenth is crossed
        now[0] += 11
        advance(1)
    lines = stream.getvalue().splitlines()
    assert [x.split(" (")[0] for x in lines if x.startswith("few")] == [f"few: {i}/4" for i in range(5)]
    assert [x.split(" (")[0] for x in lines if x.startswith("many")] == [
        f"many: {i}/1000" for i in range(0, 1001, 100)
    ]
    assert [x.split(" (")[0] for x in lines if x.startswith("slow")] == [f"slow: {i}/1000" for i in range(6)]


def test_version_matches_the_package():
    outcome = invoke(["--version"])
    assert outcome.code == 0 and outcome.stdout.strip() == f"maskscope {ms.__version__}"
