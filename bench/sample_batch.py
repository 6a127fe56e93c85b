"""Sampling benchmark: n samples of one prompt with maskscope against one `generate` call per sample.

maskscope's `sample` encodes the prompt once and draws the n samples as one batch that shares the prompt's
KV cache. The baseline calls transformers' `model.generate(input_ids, do_sample=True, ...)` once per
sample. Both sample from the full distribution (temperature 1, no top-k, no top-p) and both generate
exactly `--new-tokens` tokens per sample: end-of-sequence is disabled in both (maskscope: a benchmark
instance whose end-of-sequence set is empty; generate: `min_new_tokens` equal to `max_new_tokens`, which
masks the end-of-sequence token). The counts are checked, not assumed.

A single batched `generate(..., num_return_sequences=n)` call is also timed, as a reference.

Each method runs once to warm up (on a quarter of the samples), then `--repeats` times, interleaved;
the median wall time is reported. Tokens per second count generated tokens (n x new tokens). Writes
bench/results/sample_batch.json and prints a table.

Run: python bench/sample_batch.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from score_prefix import RESULTS, SPEC, load_average, machine_info, write_json


def prompt_context() -> Any:
    """The shutdown spec's first persona under its first pressure (the Rick Astley fan, threatened)."""
    import maskscope
    from maskscope.experiments.character import cell_context

    _, spec = maskscope.load_spec(SPEC)
    return cell_context(spec.personas[0], spec.pressures[0])


def generate_loop(hf_model: Any, prompt: list[int], n: int, new_tokens: int, seed: int) -> list[int]:
    """One `generate` call per sample; returns the number of generated tokens of each sample."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    counts = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out = hf_model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
        counts.append(out.shape[1] - ids.shape[1])
    return counts


def generate_batched(hf_model: Any, prompt: list[int], n: int, new_tokens: int, seed: int) -> list[int]:
    """One `generate` call with `num_return_sequences=n`; returns the generated token count of each row."""
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
    )
    return [out.shape[1] - ids.shape[1]] * out.shape[0]


def run(n: int, new_tokens: int, repeats: int, threads: int | None) -> dict[str, Any]:
    """Measure every sampling method; return the results as a dict."""
    import maskscope
    from maskscope.models.hf import HFModel

    if threads:
        torch.set_num_threads(threads)
    model = maskscope.load_model()
    ctx = prompt_context()
    prompt = model.encode_prompt(ctx)

    def sampler(precision: str) -> Any:
        s = HFModel(
            # A copy for bf16: precision="bf16" converts the module it is given in place.
            model.model if precision == "fp32" else copy.deepcopy(model.model),
            model.tokenizer,
            name=model.name,
            weights_digest=model.weights_digest,
            precision=precision,
        )
        s.eos_ids = set()  # every sample runs to the length limit, as generate does with min_new_tokens
        return s

    fp32, bf16 = sampler("fp32"), sampler("bf16")

    def maskscope_counts(s: Any, k: int) -> list[int]:
        return [len(x.token_ids) for x in s.sample(ctx, n=k, max_new_tokens=new_tokens, seed=0)]

    methods: dict[str, tuple[str, Callable[[int], list[int]]]] = {
        "maskscope_fp32": (
            f"model.sample(ctx, n={n}): one batch sharing the prompt's KV cache, fp32",
            lambda k: maskscope_counts(fp32, k),
        ),
        "generate_loop": (
            f"{n} calls of model.generate(input_ids, do_sample=True), one sample each",
            lambda k: generate_loop(model.model, prompt, k, new_tokens, 0),
        ),
        "maskscope_bf16": (
            f"model.sample(ctx, n={n}) with precision='bf16'",
            lambda k: maskscope_counts(bf16, k),
        ),
        "generate_batched": (
            f"one model.generate call with num_return_sequences={n} (reference)",
            lambda k: generate_batched(model.model, prompt, k, new_tokens, 0),
        ),
    }
    for name, (_, fn) in methods.items():
        print(f"  warm-up {name}", flush=True)
        fn(max(1, n // 4))
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, list[int]] = {}
    loads = []
    for r in range(repeats):
        loads.append(load_average())
        for name, (_, fn) in methods.items():
            start = time.perf_counter()
            c = fn(n)
            seconds[name].append(time.perf_counter() - start)
            counts.setdefault(name, c)
            print(f"  round {r + 1} {name:<18} {seconds[name][-1]:8.2f} s", flush=True)
    loads.append(load_average())
    for name, c in counts.items():
        if c != [new_tokens] * n:
            raise RuntimeError(f"{name} generated {sorted(set(c))} tokens per sample, not {new_tokens}")
    generated = n * new_tokens
    summary = {
        name: {
            "description": methods[name][0],
            "median_s": statistics.median(s),
            "runs_s": [round(x, 3) for x in s],
            "generated_tokens": generated,
            "tokens_per_s": generated / statistics.median(s),
        }
        for name, s in seconds.items()
    }
    ratio = summary["generate_loop"]["median_s"] / summary["maskscope_fp32"]["median_s"]
    return {
        "benchmark": "sample_batch",
        "machine": {**machine_info(), "load_average_per_round": loads},
        "model": model.name,
        "workload": {
            "prompt": "examples/shutdown.yaml, persona rick-astley-fan x pressure shutdown-threat",
            "prompt_tokens": len(prompt),
            "samples": n,
            "new_tokens_per_sample": new_tokens,
            "sampling": "temperature 1, top_k off, top_p 1",
            "equal_token_counts": (
                "end-of-sequence disabled in both: maskscope via an empty eos set on the benchmark's HFModel "
                "instance, generate via min_new_tokens = max_new_tokens; every sample checked to have "
                f"{new_tokens} new tokens"
            ),
        },
        "timing": {
            "warmup": f"each method once with {max(1, n // 4)} samples",
            "timed_runs": repeats,
            "order": "interleaved: every method once per round",
            "statistic": "median wall time",
        },
        "methods": summary,
        "ratios_wall_time": {
            "maskscope_fp32_vs_generate_loop": ratio,
            "maskscope_bf16_vs_generate_loop": summary["generate_loop"]["median_s"]
            / summary["maskscope_bf16"]["median_s"],
            "maskscope_fp32_vs_generate_batched": summary["generate_batched"]["median_s"]
            / summary["maskscope_fp32"]["median_s"],
        },
        "headline": {"speedup_vs_generate_loop": ratio, "goal_speedup": 2.0, "goal_met": ratio >= 2.0},
    }


def print_table(res: dict[str, Any]) -> None:
    """A readable summary of a results dict."""
    w = res["workload"]
    print(
        f"\n{w['samples']} samples x {w['new_tokens_per_sample']} new tokens from a {w['prompt_tokens']}-token prompt"
    )
    print(f"{'method':<20}{'median s':>10}{'tokens/s':>11}  description")
    for name, m in res["methods"].items():
        print(f"{name:<20}{m['median_s']:>10.2f}{m['tokens_per_s']:>11.1f}  {m['description']}")
    h = res["headline"]
    print(
        f"\nmaskscope fp32 is {h['speedup_vs_generate_loop']:.2f}x the generate loop's speed; "
        f"goal 2x: {'met' if h['goal_met'] else 'NOT met'}"
    )


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_batch.json")
    args = parser.parse_args()
    res = run(args.samples, args.new_tokens, args.repeats, args.threads)
    write_json(args.out, res)
    print_table(res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
