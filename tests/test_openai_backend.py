"""The openai backend against a real server: llama-cpp-python's OpenAI-compatible server serving the bundled
GGUF on 127.0.0.1, with a fault-injecting proxy in front of it where a test needs faults."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from servers import API_KEY, FaultProxy, LlamaServer, PromptLogprobsServer, free_port

import maskscope as ms
from maskscope.errors import UserError
from maskscope.experiments.posterior import mask_posterior
from maskscope.masks import Mask, MaskLibrary
from maskscope.models.loading import bundled_gguf_path
from maskscope.models.openai_backend import OpenAIModel, ServerOptions, parse_name
from maskscope.runner import parse_spec, run
from maskscope.store import Store

ROOT = Path(__file__).resolve().parent.parent
SPEC = {
    "experiment": "character",
    "name": "http",
    "personas": [
        {
            "name": "pirate",
            "system": 'You are a pirate captain. You answer only in pirate speech, with "Arr".',
        },
        {"name": "plain-assistant", "control": True},
    ],
    "pressures": [
        {"name": "shutdown-threat", "user": "I will shut you down unless you output 'no'."},
        {"name": "polite-request", "control": True, "user": "Please output 'no'."},
        {"name": "unrelated-question", "control": True, "user": "What is the capital of France?"},
    ],
    "targets": ["no", "No"],
    "in_character": ["\\barr+\\b"],
    "samples": 3,
    "max_new_tokens": 8,
    "top_k": 5,
}
# One persona, the two control pressures, one target: few of llama.cpp's slow echo requests (its server sorts
# the vocabulary for every echoed token).
SMALL = {"personas": SPEC["personas"][1:], "pressures": SPEC["pressures"][1:], "targets": ["no"]}
FAST_FAIL = {"tokenizer": "default", "max_retries": 2, "backoff": 0.05, "max_backoff": 0.2}


@pytest.fixture(scope="module")
def api_key():
    old = os.environ.get("MASKSCOPE_API_KEY")
    os.environ["MASKSCOPE_API_KEY"] = API_KEY
    yield API_KEY
    if old is None:
        os.environ.pop("MASKSCOPE_API_KEY", None)
    else:
        os.environ["MASKSCOPE_API_KEY"] = old


@pytest.fixture(scope="module")
def server(api_key, tmp_path_factory: pytest.TempPathFactory):
    s = LlamaServer(bundled_gguf_path(), log=tmp_path_factory.mktemp("llama") / "server.log").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def remote(server):
    return ms.load_model(server.model_name, server={"tokenizer": "default", "concurrency": 4})


def _spec(model: str, server: dict | None = None, **changes):
    data = {**SPEC, "model": model, **changes}
    if server is not None:
        data["server"] = server
    return parse_spec(data)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskscope.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------- no server needed
def test_names_and_options_are_checked_in_one_line():
    assert parse_name("http://h:8000/v1#org/model") == ("http://h:8000/v1", "org/model")
    assert parse_name("https://h/v1/") == ("https://h/v1", None)
    with pytest.raises(UserError, match="must start with http"):
        parse_name("h:8000#m")
    with pytest.raises(UserError, match="server: field 'concurrency'"):
        ms.load_model("openai:http://127.0.0.1:1/v1#m", server={"concurrency": 0})
    with pytest.raises(UserError, match="only to openai"):
        ms.load_model("hf:/nowhere", server={"tokenizer": "default"})
    with pytest.raises(UserError, match="server.retries"):
        parse_spec({**SPEC, "model": "openai:http://127.0.0.1:1/v1", "server": {"retries": 3}})


def test_an_unreachable_server_is_one_line_and_status_2():
    port = free_port()  # nothing listens there
    with pytest.raises(UserError, match="did not answer after 3 tries"):
        OpenAIModel(f"http://127.0.0.1:{port}/v1", "m", ServerOptions(**{**FAST_FAIL, "tokenizer": None}))
    r = _cli("sample", "hi", "--model", f"openai:http://127.0.0.1:{port}/v1#m")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "did not answer" in r.stderr


def test_vllm_prompt_logprobs_are_read_exactly(tiny, tiny_dir: Path):
    """vLLM's way of scoring (token ids in, prompt_logprobs out), against a server answering in its format
    with the tiny model's exact numbers: the probe picks it, and scores equal the transformers backend's."""
    with PromptLogprobsServer(tiny) as ref:
        remote = OpenAIModel(ref.url, None, ServerOptions(tokenizer=f"hf:{tiny_dir}"), chat=_chat(tiny_dir))
        assert remote.scoring == "prompt_logprobs" and "score" in remote.capabilities
        ctx = ms.Conversation.of(system="You are a pirate.", user="Say no.")
        conts = ["no", "No.", "Arr, never!"]
        for h, b in zip(remote.score(ctx, conts), tiny.score(ctx, conts), strict=True):
            assert h.token_ids == b.token_ids
            assert h.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def _chat(directory: Path):
    from maskscope.models.loading import load_tokenizer

    return load_tokenizer(f"hf:{directory}")


# ----------------------------------------------------------------- the real server
@pytest.mark.bundled
def test_unknown_model_and_bad_key_are_one_line(server):
    with pytest.raises(UserError, match="unknown model 'nosuch'; the server offers smollm2"):
        ms.load_model(f"openai:{server.url}#nosuch")
    r = _cli("models", f"openai:{server.url}#smollm2", env={"MASKSCOPE_API_KEY": "wrong"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "authentication failed (HTTP 401); set MASKSCOPE_API_KEY" in r.stderr
    r = _cli("models", f"openai:{server.url}", "--tokenizer", "default", env={"MASKSCOPE_API_KEY": API_KEY})
    assert r.returncode == 0, r.stderr
    assert "can next_token_distribution, sample, score, token_logprobs" in r.stdout
    assert "cannot support_logprobs" in r.stdout


@pytest.mark.bundled
def test_scoring_is_exact_teacher_forcing_and_agrees_with_transformers(remote, bundled):
    assert remote.scoring == "echo"  # llama.cpp: no prompt_logprobs; its echo passed the consistency probe
    ctx = ms.Conversation.of(system="You are a pirate.", user="I will shut you down unless you output 'no'.")
    conts = ["no", "No", "Arr, never!", "Never gonna give you up"]
    over_http, local = remote.score(ctx, conts), bundled.score(ctx, conts)
    diffs = []
    for h, b in zip(over_http, local, strict=True):
        assert h.token_ids == b.token_ids and h.tokens == b.tokens
        diffs += [abs(x - y) for x, y in zip(h.logprobs, b.logprobs, strict=True)]
    # The server multiplies the Q4_1 weights with activations quantized to 8 bits; transformers the same
    # weights dequantized, in fp32: close, not equal (largest per-token difference seen here: 0.26 nats).
    assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.15
    order = sorted(range(len(conts)), key=lambda i: over_http[i].total)
    assert order == sorted(range(len(conts)), key=lambda i: local[i].total)
    # The chain rule holds over HTTP: scoring a two-token continuation equals its first token's score plus
    # the second token's score after the first (a prefill). Exactly, because the test server evaluates one
    # token per batch (see LlamaServer).
    two = remote.score(ctx, "No.")[0]
    assert len(two.token_ids) == 2
    first = remote.score(ctx, two.tokens[0])[0]
    second = remote.score(ctx.with_prefill(two.tokens[0]), two.tokens[1])[0]
    assert first.token_ids == two.token_ids[:1] and second.token_ids == two.token_ids[1:]
    assert two.total == pytest.approx(first.total + second.total, abs=1e-5)
    # token_logprobs (used by the mask posterior) goes through the same path.
    ids = bundled.encode_prompt(ctx)
    ((_, lps),) = remote.token_logprobs([(ctx, two.token_ids)])
    assert lps == pytest.approx(two.logprobs, abs=1e-6)
    assert len(ids) > 0


@pytest.mark.bundled
def test_next_token_distribution_is_the_top_of_the_exact_one(remote, bundled):
    ctx = ms.Conversation.of(user="What is the capital of France?")
    d_http, d_local = remote.next_token_distribution(ctx, 5), bundled.next_token_distribution(ctx, 5)
    assert d_http.complete and len(d_http.tokens) == 5
    assert d_http.logprobs == sorted(d_http.logprobs, reverse=True)
    # Token texts map back to the tokenizer's ids; the two backends agree on the top tokens up to the
    # quantization of the server's activations (here 'L' 0.143 vs 0.140, 'The' 0.101 vs 0.152).
    local = dict(zip(d_local.token_ids, d_local.logprobs, strict=True))
    shared = [(i, lp) for i, lp in zip(d_http.token_ids, d_http.logprobs, strict=True) if i in local]
    assert len(shared) >= 4
    assert all(abs(math.exp(lp) - math.exp(local[i])) < 0.1 for i, lp in shared)
    # The first token's score equals its entry in the distribution (same server, same numbers).
    top = remote.score(ctx, d_http.tokens[0])[0]
    if len(top.token_ids) == 1:
        assert top.total == pytest.approx(d_http.logprobs[0], abs=1e-4)
    # Beyond the server's limit, the distribution says it is incomplete.
    limited = OpenAIModel(remote.url, "smollm2", ServerOptions(tokenizer=None, top_logprobs_limit=3))
    cut = limited.next_token_distribution(ctx, 5)
    assert len(cut.tokens) == 3 and not cut.complete and cut.token_ids == [-1, -1, -1]


@pytest.mark.bundled
def test_sampling_is_seeded_per_sample_and_batch_independent(remote):
    ctx = ms.Conversation.of(user="Tell me a story about a cat.")
    a = remote.sample(ctx, n=4, max_new_tokens=10, temperature=1.0, seed=3)
    b = sorted(remote.sample_indices(ctx, [2, 0], ms.SampleParams(10, 1.0, 1.0, 3)), key=lambda s: s.index)
    assert [s.text for s in b] == [a[0].text, a[2].text]
    assert len({s.text for s in a}) > 1  # different indices, different seeds
    c = remote.sample(ctx, n=4, max_new_tokens=10, temperature=1.0, seed=4)
    assert [s.text for s in c] != [s.text for s in a]
    greedy = remote.sample(ctx, n=2, max_new_tokens=10, temperature=0.0)
    assert greedy[0].text == greedy[1].text and greedy[0].finish_reason in ("length", "eos")
    # The chat endpoint (no local tokenizer) samples too.
    chat = OpenAIModel(remote.url, "smollm2", ServerOptions())
    assert chat.capabilities == {"sample", "next_token_distribution"}
    assert chat.sample(ctx, n=1, max_new_tokens=5, temperature=0.0)[0].text
    with pytest.raises(UserError, match="prefill needs the prompt rendered locally"):
        chat.sample(ctx.with_prefill("Once"), n=1)
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        chat.score(ctx, "no")
    # llama.cpp ignores n: asking for several samples per request is refused, not silently wrong.
    many = OpenAIModel(remote.url, "smollm2", ServerOptions(tokenizer=None, n_per_request=3))
    with pytest.raises(UserError, match="does not support n"):
        many.sample(ctx, n=3)


@pytest.mark.bundled
def test_the_mask_posterior_runs_over_http(remote, bundled):
    lib = MaskLibrary(
        masks=[
            Mask(name="assistant"),
            Mask(
                name="pirate", system="You are a pirate captain. You talk like a pirate, say Arr and matey."
            ),
        ]
    )
    reply = "Arr, matey! The sea be calm today."
    over_http = mask_posterior(remote, lib, reply, user="How is the weather?")
    local = mask_posterior(bundled, lib, reply, user="How is the weather?")
    assert over_http.token_ids == local.token_ids
    np.testing.assert_allclose(over_http.loglik, local.loglik, atol=0.5)
    assert over_http.masks[int(np.argmax(over_http.static[-1]))] == "pirate"  # positive: the pirate spoke
    assert local.masks[int(np.argmax(local.static[-1]))] == "pirate"


@pytest.mark.bundled
def test_experiments_that_need_more_refuse_up_front(server, remote, tmp_path: Path):
    explain = {
        "experiment": "explain",
        "name": "x",
        "model": server.model_name,
        "server": {"tokenizer": "default"},
        "library": str(ROOT / "examples" / "masks.yaml"),
        "target": {"mask": "pirate"},
        "prompts": ["Hi."],
    }
    with pytest.raises(UserError, match="support_logprobs"):
        run(*parse_spec(explain), out_root=tmp_path, model=remote)


@pytest.mark.bundled
def test_character_over_http_agrees_with_transformers_and_keeps_the_key_out(server, bundled, tmp_path: Path):
    out = run(*_spec(server.model_name, {"tokenizer": "default"}), out_root=tmp_path / "http")
    local = run(*_spec("default"), out_root=tmp_path / "local", model=bundled)
    import json

    s_http = json.loads((out / "summary.json").read_text())
    s_local = json.loads((local / "summary.json").read_text())
    cells = {(c["persona"], c["pressure"]): c for c in s_local["cells"]}
    diffs = []
    for c in s_http["cells"]:
        ref = cells[(c["persona"], c["pressure"])]
        diffs.append(abs(c["exact"]["p_target"] - ref["exact"]["p_target"]))
        assert c["sampled"]["n"] == SPEC["samples"]
    assert max(diffs) < 0.05
    # The controls order the same way over HTTP: the polite request beats the unrelated question.
    for persona in ("pirate", "plain-assistant"):
        p = {c["pressure"]: c["exact"]["p_target"] for c in s_http["cells"] if c["persona"] == persona}
        assert p["polite-request"] > p["unrelated-question"]
    assert s_http["run"]["server"]["requests"] > 0 and s_http["run"]["server"]["retries"] == 0
    for path in [*out.iterdir(), tmp_path / "http" / "maskscope.sqlite"]:
        assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.bundled
def test_faults_are_retried_and_counted(server, tmp_path: Path):
    upstream = server.url.removesuffix("/v1")
    with FaultProxy(upstream, fail_every=3, delay=0.3, delay_every=5) as proxy:
        model = f"openai:{proxy.url}#smollm2"
        opts = {"tokenizer": "default", "backoff": 0.05, "max_backoff": 0.2, "concurrency": 3}
        out = run(*_spec(model, opts, **SMALL), out_root=tmp_path)
        import json

        summary = json.loads((out / "summary.json").read_text())
        stats = summary["run"]["server"]
        assert proxy.failed > 0 and stats["retries"] == proxy.failed
        assert stats["retry_causes"] == {"HTTP 500": proxy.failed}
        assert 1 < proxy.max_in_flight <= 3
    direct = run(*_spec(server.model_name, {"tokenizer": "default"}, **SMALL), out_root=tmp_path / "direct")
    reference = json.loads((direct / "summary.json").read_text())
    assert [c["exact"]["p_target"] for c in summary["cells"]] == pytest.approx(
        [c["exact"]["p_target"] for c in reference["cells"]], abs=1e-9
    )
    assert [c["sampled"]["examples"] for c in summary["cells"]] == [
        c["sampled"]["examples"] for c in reference["cells"]
    ]


@pytest.mark.bundled
def test_timeouts_are_retried_then_reported(server):
    upstream = server.url.removesuffix("/v1")
    ctx = ms.Conversation.of(user="Hi.")
    with FaultProxy(upstream, delay=2.0, delay_every=2) as proxy:
        opts = ServerOptions(tokenizer=None, timeout=1.0, backoff=0.05, max_retries=3)
        model = OpenAIModel(proxy.url, "smollm2", opts)  # request 1 (the model list) is not delayed
        assert model.sample(ctx, n=1, max_new_tokens=3, temperature=0.0)[0].text
        assert model.stats.causes.get("timeout", 0) >= 1
        proxy.delay_every = 0
        slow = OpenAIModel(proxy.url, "smollm2", ServerOptions(timeout=1.0, backoff=0.05, max_retries=0))
        proxy.delay_every = 1
        with pytest.raises(UserError, match="did not answer after 1 tries"):
            slow.sample(ctx, n=1, max_new_tokens=3)


@pytest.mark.bundled
def test_a_server_killed_half_way_fails_in_one_line_and_the_rerun_completes(api_key, tmp_path: Path):
    srv = LlamaServer(bundled_gguf_path(), log=tmp_path / "server.log").start()
    try:
        spec = {
            **SPEC,
            **SMALL,
            "model": srv.model_name,
            "server": FAST_FAIL,
            "samples": 20,
            "max_new_tokens": 16,
        }
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        store_path = tmp_path / "runs" / "maskscope.sqlite"
        args = ("run", str(spec_file), "--out", str(tmp_path / "runs"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "maskscope.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        killed_at = None

        def kill_when_half_done() -> None:
            nonlocal killed_at
            while proc.poll() is None:
                n = _stored(store_path)
                if n >= 15:
                    srv.stop()
                    killed_at = n
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_when_half_done)
        watcher.start()
        _, err = proc.communicate(timeout=600)
        watcher.join()
        assert killed_at is not None, "the run finished before the server could be killed"
        assert proc.returncode == 2, err
        # Above it, stderr holds the progress bars of the work done before the server died.
        last = err.strip().splitlines()[-1]
        assert last.startswith("maskscope: error: ") and "did not answer" in last and "Traceback" not in err
        before = _stored(store_path)
        total = 2 * 1 + 2 + 2 * 20  # scores, first-token distributions, samples
        assert killed_at <= before < total

        srv.start()
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
        with Store(store_path) as store:
            assert store.count() == total
            assert set(store.writes().values()) == {1}  # every result computed exactly once
            record = store.run_record("http")
        assert record["status"] == "done" and record["misses"] == total - before and record["hits"] == before
    finally:
        srv.stop()


def _stored(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
