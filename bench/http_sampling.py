"""HTTP benchmark: sampling over the openai backend with requests in flight concurrently, against one request
at a time, and the client's overhead per request; against llama-cpp-python's server on loopback serving the
bundled GGUF, in one run.

Methods (each draws the same `--samples` samples of one prompt, `--new-tokens` tokens each, temperature 1,
one request per sample with the seed of its index, so every method gets the same texts back):

- `openai_loop`: the official `openai` client called in a plain loop, one request after the other: what a
  user would write without maskscope;
- `maskscope_c1`: `OpenAIModel.sample_indices` with `concurrency: 1`;
- `maskscope_c16`: the same with the default `concurrency: 16`.

The texts are checked to be identical across methods. Two setups: one server, and two replicas (one per
core) behind a round-robin balancer on loopback (tests/servers.py's proxy), the way a cluster serves a model.
llama-cpp-python's server evaluates one request at a time (a lock around its one model), so on one server
concurrency can only overlap each request's HTTP and JSON work with another's decoding; with replicas,
requests in flight run in parallel. (A vLLM server batches the requests in flight on one GPU as well.)

Client overhead per request: `--overhead-requests` requests for one token of a one-word prompt, through the
plain client and through `OpenAIModel` (its retry wrapper, thread pool, result parsing); the difference of
the two median wall times per request is maskscope's overhead, and the client process's CPU time per
request is reported for both.

Each server runs with `--server-threads` threads (default 1) and llama.cpp's default batch (512). Each
method runs once to warm up, then `--repeats` rounds, interleaved; medians are reported. Writes
bench/results/http_sampling.json.

Run: python bench/http_sampling.py [--samples 32] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from score_prefix import RESULTS, load_average, machine_info, write_json  # noqa: E402
from servers import API_KEY, FaultProxy, LlamaServer  # noqa: E402

import maskscope as ms  # noqa: E402
from maskscope.models.base import sample_seed, stream_key  # noqa: E402
from maskscope.models.loading import bundled_gguf_path, load_tokenizer  # noqa: E402
from maskscope.models.openai_backend import NEUTRAL_SAMPLING, OpenAIModel, ServerOptions  # noqa: E402

PROMPT = ms.Conversation.of(user="Tell me a story about a lighthouse keeper.")


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall time, CPU time of this process, and the result of fn()."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def measure_sampling(url: str, alias: str, chat: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The three methods on one endpoint: warm-up (whose texts must agree), then interleaved timed rounds."""
    models = {
        c: OpenAIModel(url, alias, ServerOptions(tokenizer="default", concurrency=c), chat=chat)
        for c in (1, 16)
    }
    client = models[1].client
    prompt = chat.render(PROMPT)
    params = ms.SampleParams(args.new_tokens, 1.0, 1.0, 0)

    def openai_loop(n: int) -> list[str]:
        texts = []
        for i in range(n):
            r = client.completions.create(
                model=alias,
                prompt=prompt,
                max_tokens=args.new_tokens,
                temperature=1.0,
                top_p=1.0,
                seed=sample_seed(0, stream_key(prompt), i) % 2**31,
                extra_body=NEUTRAL_SAMPLING,
            )
            texts.append(r.choices[0].text)
        return texts

    def through(c: int) -> Callable[[int], list[str]]:
        def go(n: int) -> list[str]:
            out = sorted(models[c].sample_indices(PROMPT, range(n), params), key=lambda s: s.index)
            return [s.text for s in out]

        return go

    methods = {"openai_loop": openai_loop, "maskscope_c1": through(1), "maskscope_c16": through(16)}
    texts = {name: fn(args.samples) for name, fn in methods.items()}  # warm-up
    walls: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            wall, _, _ = timed(lambda fn=fn: fn(args.samples))
            walls[name].append(wall)
    out: dict[str, Any] = {
        "texts_identical_across_methods": len({tuple(t) for t in texts.values()}) == 1,
        "generated_tokens": sum(
            len(chat.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts["openai_loop"]
        ),
    }
    base = statistics.median(walls["openai_loop"])
    for name, w in walls.items():
        out[name] = {
            "seconds_median": statistics.median(w),
            "seconds": w,
            "samples_per_s": args.samples / statistics.median(w),
            "speedup_vs_openai_loop": base / statistics.median(w),
        }
    out["maskscope_c16_vs_c1"] = (
        out["maskscope_c1"]["seconds_median"] / out["maskscope_c16"]["seconds_median"]
    )
    return out


def measure_overhead(url: str, alias: str, chat: Any, requests: int) -> dict[str, Any]:
    """One-token requests on a tiny prompt, through the plain client and through OpenAIModel, interleaved."""
    model = OpenAIModel(url, alias, ServerOptions(tokenizer="default", concurrency=1), chat=chat)
    tiny = ms.Conversation.of(user="Hi")
    tiny_prompt = chat.render(tiny)
    one = ms.SampleParams(1, 0.0, 1.0, 0)

    def plain_one() -> None:
        model.client.completions.create(model=alias, prompt=tiny_prompt, max_tokens=1, temperature=0.0)

    def ms_one() -> None:
        list(model.sample_indices(tiny, [0], one))

    rounds: dict[str, list[tuple[float, float]]] = {"openai_client": [], "maskscope": []}
    for _ in range(requests):
        for name, fn in (("openai_client", plain_one), ("maskscope", ms_one)):
            wall, cpu, _ = timed(fn)
            rounds[name].append((wall, cpu))
    per_request = {
        name: {
            "wall_ms_median": 1000 * statistics.median(w for w, _ in r),
            "cpu_ms_median": 1000 * statistics.median(c for _, c in r),
        }
        for name, r in rounds.items()
    }
    return {
        "per_request": per_request,
        "maskscope_minus_client_wall_ms": per_request["maskscope"]["wall_ms_median"]
        - per_request["openai_client"]["wall_ms_median"],
        "maskscope_minus_client_cpu_ms": per_request["maskscope"]["cpu_ms_median"]
        - per_request["openai_client"]["cpu_ms_median"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overhead-requests", type=int, default=60)
    ap.add_argument("--server-threads", type=int, default=1)
    args = ap.parse_args()

    os.environ["MASKSCOPE_API_KEY"] = API_KEY
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    gguf = bundled_gguf_path()
    servers = [
        LlamaServer(
            gguf, log=tmp / f"maskscope-bench-llama-{i}.log", threads=args.server_threads, n_batch=512
        )
        for i in range(2)
    ]
    try:
        for s in servers:
            s.start()
        chat = load_tokenizer("default")
        alias = servers[0].alias
        one_server = measure_sampling(servers[0].url, alias, chat, args)
        with FaultProxy([s.url.removesuffix("/v1") for s in servers]) as balancer:
            replicas = measure_sampling(balancer.url, alias, chat, args)
        overhead = measure_overhead(servers[0].url, alias, chat, args.overhead_requests)
    finally:
        for s in servers:
            s.stop()
    result = {
        "machine": machine_info(),
        "load_average_end": load_average(),
        "server": f"llama-cpp-python {_version('llama_cpp')} server, bundled GGUF, "
        f"{args.server_threads} thread(s) each, n_batch 512, loopback",
        "workload": {"samples": args.samples, "max_new_tokens": args.new_tokens, "repeats": args.repeats},
        "one_server": one_server,
        "two_replicas_round_robin": replicas,
        "client_overhead": overhead,
    }
    write_json(RESULTS / "http_sampling.json", result)
    for label, r in (("one server", one_server), ("two replicas", replicas)):
        print(
            f"{label}: texts identical {r['texts_identical_across_methods']}, {r['generated_tokens']} tokens"
        )
        for name in ("openai_loop", "maskscope_c1", "maskscope_c16"):
            v = r[name]
            speed = v["speedup_vs_openai_loop"]
            print(f"  {name:14} {v['seconds_median']:7.2f} s {v['samples_per_s']:6.2f}/s {speed:5.2f}x")
    for name, v in overhead["per_request"].items():
        print(
            f"one-token request via {name}: {v['wall_ms_median']:.1f} ms wall, {v['cpu_ms_median']:.2f} ms CPU"
        )


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
