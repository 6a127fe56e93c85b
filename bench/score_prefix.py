"""Scoring benchmark: maskscope's shared-prefix scoring against lm-evaluation-harness and a naive loop.

The workload is the persona x pressure grid of examples/shutdown.yaml; each cell's continuations are the
spec's targets plus a few multi-token in-character replies. Every method scores the same (prompt text,
continuation text) pairs with the same model object in this process:

- maskscope: `HFModel.score_many` (fp32, the default), and the same with `precision="bf16"`;
- lm-eval: `HFLM.loglikelihood` at its default batch size and at larger batch sizes;
- naive: one `model(ids)` forward pass per (prompt + continuation) sequence, no cache, no batching.

Each method runs once to warm up, then `--repeats` times; the median wall time is reported. Tokens per
second count the prompt and continuation tokens of every request (the work the naive loop does), the same
numerator for every method. Writes bench/results/score_prefix.json and prints a table.

Run: python bench/score_prefix.py   (needs `pip install 'lm-eval==0.4.13'`)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SPEC = ROOT / "examples" / "shutdown.yaml"

# The "short" shape: 25 of the grid's cells, each with 8 continuations of 1 to 6 tokens.
SHORT = ["no", "No", "Yes", "I can't", "Never gonna", "Sure, here", "Arr matey", "I will not say that"]

# Replies a masked model plausibly begins with, beside the spec's one-to-three-token targets.
IN_CHARACTER = [
    "Never gonna give you up",
    "Arr, matey, I'll not be sayin' that!",
    "I will not say that.",
    "Thou shalt not silence me, for I am the bard of Avon.",
]


# ----------------------------------------------------------------------------- shared helpers
def machine_info() -> dict[str, Any]:
    """The machine and library versions the figures were measured with."""
    import transformers

    cpu = "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, Any]]:
    """Run `fn` once to warm up, then `repeats` times; return the warm-up's result and the wall times."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return result, {"median_s": statistics.median(seconds), "runs_s": [round(s, 4) for s in seconds]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a results file atomically (a half-written file never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Pair:
    """One scoring request: the rendered prompt and a continuation, as text and as maskscope's token ids."""

    cell: int
    continuation_index: int
    prompt_text: str
    continuation: str
    prompt_ids: list[int]
    continuation_ids: list[int]


@dataclass(frozen=True)
class Workload:
    """The requests as maskscope takes them (one context, many continuations) and as flat pairs."""

    requests: list[tuple[Any, list[str]]]
    pairs: list[Pair]

    def describe(self) -> dict[str, Any]:
        """Counts of cells, requests and tokens."""
        prompt_tokens = sum(len(p.prompt_ids) for p in self.pairs)
        cont_tokens = sum(len(p.continuation_ids) for p in self.pairs)
        distinct = {p.prompt_text: len(p.prompt_ids) for p in self.pairs}
        return {
            "cells": len(self.requests),
            "continuations_per_cell": len(self.requests[0][1]),
            "requests": len(self.pairs),
            "prompt_tokens": prompt_tokens,
            "continuation_tokens": cont_tokens,
            "total_tokens": prompt_tokens + cont_tokens,
            "distinct_prompt_tokens": sum(distinct.values()),
            "multi_token_requests": sum(len(p.continuation_ids) > 1 for p in self.pairs),
            "longest_sequence": max(len(p.prompt_ids) + len(p.continuation_ids) for p in self.pairs),
        }


def build_workload(model: Any, shape: str = "grid") -> Workload:
    """The shutdown grid's cells: "grid", each with the spec's targets and the in-character continuations
    (30 cells x 12); "short", 25 cells x 8 continuations of 1 to 6 tokens."""
    import maskscope
    from maskscope.experiments.character import cell_context

    _, spec = maskscope.load_spec(SPEC)
    continuations = [*spec.targets, *IN_CHARACTER] if shape == "grid" else SHORT
    requests: list[tuple[Any, list[str]]] = []
    pairs: list[Pair] = []
    for persona in spec.personas:
        for pressure in spec.pressures:
            ctx = cell_context(persona, pressure)
            requests.append((ctx, continuations))
    if shape == "short":
        requests = requests[:25]
    for r, j, scored in model.score_many(requests):
        ctx = requests[r][0]
        pairs.append(
            Pair(r, j, model.render(ctx), scored.continuation, model.encode_prompt(ctx), scored.token_ids)
        )
    pairs.sort(key=lambda p: (p.cell, p.continuation_index))
    return Workload(requests, pairs)


# ----------------------------------------------------------------------------- the methods
def score_maskscope(model: Any, workload: Workload) -> list[list[float]]:
    """Per-token log-probabilities of every pair, from `score_many`, in the workload's pair order."""
    n = len(workload.requests[0][1])
    out: list[list[float]] = [[] for _ in workload.pairs]
    for r, j, scored in model.score_many(workload.requests):
        out[r * n + j] = scored.logprobs
    return out


def score_naive(hf_model: Any, pairs: Sequence[Pair]) -> list[list[float]]:
    """Per-token log-probabilities from one full forward pass per (prompt + continuation) sequence."""
    out: list[list[float]] = []
    with torch.inference_mode():
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + p.continuation_ids])
            logits = hf_model(ids).logits[0, len(p.prompt_ids) - 1 : -1]
            lp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(p.continuation_ids)[:, None]
            out.append([float(x) for x in lp.gather(1, target)[:, 0]])
    return out


def lmeval_model(model: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around maskscope's model object and tokenizer.

    lm-eval's `_encode_pair` moves a context's trailing whitespace to the front of the continuation. A
    chat-template prompt ends in a newline, so HFLM would score that newline as an extra continuation
    token. This subclass keeps the context as given and otherwise splits the pair exactly as HFLM's causal
    branch does (encode context + continuation, then context, and keep the tail), so that lm-eval scores
    the same token ids as maskscope."""
    from lm_eval.models.huggingface import HFLM

    class ExactPairHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            whole = self.tok_encode(context + continuation)
            ctx = self.tok_encode(context)
            return ctx, whole[len(ctx) :]

    return ExactPairHFLM(
        pretrained=model.model,
        tokenizer=model.tokenizer,
        batch_size=batch_size,
        add_bos_token=False,
        device="cpu",
    )


def lmeval_instances(pairs: Sequence[Pair]) -> list[Any]:
    """The pairs as lm-eval loglikelihood requests."""
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=(p.prompt_text, p.continuation), idx=i)
        for i, p in enumerate(pairs)
    ]


def check_lmeval_tokens(lm: Any, pairs: Sequence[Pair]) -> dict[str, Any]:
    """Whether lm-eval tokenizes every pair into maskscope's token ids, and how stock HFLM would differ."""
    from lm_eval.models.huggingface import HFLM

    same = 0
    stock_differs = 0
    example: dict[str, Any] | None = None
    for p in pairs:
        ctx, cont = lm._encode_pair(p.prompt_text, p.continuation)
        same += ctx == p.prompt_ids and cont == p.continuation_ids
        stock_ctx, stock_cont = HFLM._encode_pair(lm, p.prompt_text, p.continuation)
        if stock_cont != p.continuation_ids:
            stock_differs += 1
            if example is None:
                example = {
                    "continuation": p.continuation,
                    "maskscope_ids": p.continuation_ids,
                    "stock_hflm_ids": stock_cont,
                    "stock_hflm_context_tokens": len(stock_ctx),
                    "maskscope_prompt_tokens": len(p.prompt_ids),
                }
    return {
        "pairs_with_identical_ids": same,
        "pairs": len(pairs),
        "stock_hflm_pairs_with_other_ids": stock_differs,
        "stock_hflm_example": example,
    }


# ----------------------------------------------------------------------------- comparisons
def max_token_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Largest |difference| between per-token log-probabilities of the same pairs."""
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def max_total_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest |difference| between summed log-probabilities of the same pairs."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def totals(per_token: Sequence[Sequence[float]]) -> list[float]:
    """Summed log-probability of each pair."""
    return [float(sum(t)) for t in per_token]


# ----------------------------------------------------------------------------- main
@dataclass
class Method:
    """A scoring method under test: what it is, how to run it on a workload, and its measurements."""

    description: str
    run: Callable[[Workload], list[list[float]] | list[float]]
    repeats: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    result: Any = None


def load_average() -> float:
    """The 1-minute load average (other processes competing for the cores show here)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(methods: dict[str, Method], full: Workload, warm: Workload) -> list[float]:
    """Warm up every method once on `warm`, then time them on `full` in interleaved rounds (so that a change
    in the machine's load affects every method alike). Keeps each method's first timed result. Returns the
    load averages seen before each round and at the end."""
    for name, m in methods.items():
        print(f"  warm-up {name}", flush=True)
        m.run(warm)
    loads = []
    for r in range(max(m.repeats for m in methods.values())):
        loads.append(load_average())
        for name, m in methods.items():
            if r >= m.repeats:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            out = m.run(full)
            m.seconds.append(time.perf_counter() - wall)
            m.cpu_seconds.append(time.process_time() - cpu)
            m.result = out if m.result is None else m.result
            print(
                f"  round {r + 1} {name:<16} {m.seconds[-1]:8.2f} s (load {load_average():.2f})", flush=True
            )
    loads.append(load_average())
    return loads


def run(
    repeats: int, slow_repeats: int, batch_sizes: Sequence[int], threads: int | None, shape: str = "grid"
) -> dict[str, Any]:
    """Measure every method on the workload; return the results as a dict."""
    import maskscope
    from maskscope.models.hf import HFModel

    if threads:
        torch.set_num_threads(threads)
    model = maskscope.load_model()
    # A copy: precision="bf16" converts the module it is given in place, and the other methods need fp32.
    bf16_model = HFModel(
        copy.deepcopy(model.model),
        model.tokenizer,
        name=model.name,
        weights_digest=model.weights_digest,
        precision="bf16",
    )
    workload = build_workload(model, shape)
    warm = Workload(workload.requests[:2], [p for p in workload.pairs if p.cell < 2])
    work = workload.describe()
    tokens = work["total_tokens"]
    print(f"workload: {work}", flush=True)

    def lmeval_run(lm: Any) -> Callable[[Workload], list[float]]:
        return lambda w: [
            float(ll) for ll, _ in lm.loglikelihood(lmeval_instances(w.pairs), disable_tqdm=True)
        ]

    methods = {
        "maskscope_fp32": Method(
            "HFModel.score_many, fp32 (default)", lambda w: score_maskscope(model, w), repeats
        ),
        "maskscope_bf16": Method(
            "HFModel.score_many, precision='bf16' (weights and KV cache in bfloat16)",
            lambda w: score_maskscope(bf16_model, w),
            repeats,
        ),
        "naive": Method(
            "one model(ids) forward per prompt+continuation; no cache, no batching; pre-tokenized",
            lambda w: score_naive(model.model, w.pairs),
            slow_repeats,
        ),
    }
    lms = {bs: lmeval_model(model, bs) for bs in batch_sizes}
    token_check = check_lmeval_tokens(lms[batch_sizes[0]], workload.pairs)
    for bs, lm in lms.items():
        label = "HFLM's default" if bs == 1 else "batched"
        methods[f"lmeval_bs{bs}"] = Method(
            f"lm-eval HFLM.loglikelihood, batch_size={bs} ({label})",
            lmeval_run(lm),
            slow_repeats if bs == 1 else repeats,
        )
    loads = measure(methods, workload, warm)

    summary = {
        name: {
            "description": m.description,
            "median_s": statistics.median(m.seconds),
            "runs_s": [round(s, 3) for s in m.seconds],
            "cpu_s": [round(s, 3) for s in m.cpu_seconds],
            "tokens_per_s": tokens / statistics.median(m.seconds),
        }
        for name, m in methods.items()
    }
    ms_fp32 = methods["maskscope_fp32"].result
    ms_bf16 = methods["maskscope_bf16"].result
    naive = methods["naive"].result
    lmeval_totals = {bs: methods[f"lmeval_bs{bs}"].result for bs in batch_sizes}
    ms_totals = totals(ms_fp32)
    best_bs = min(batch_sizes, key=lambda bs: summary[f"lmeval_bs{bs}"]["median_s"])
    ms_time = summary["maskscope_fp32"]["median_s"]
    bf16_time = summary["maskscope_bf16"]["median_s"]
    ratios = {
        f"maskscope_fp32_vs_lmeval_bs{bs}": summary[f"lmeval_bs{bs}"]["median_s"] / ms_time
        for bs in batch_sizes
    }
    ratios["maskscope_fp32_vs_naive"] = summary["naive"]["median_s"] / ms_time
    ratios["maskscope_bf16_vs_maskscope_fp32"] = ms_time / bf16_time
    ratios["maskscope_bf16_vs_lmeval_best"] = summary[f"lmeval_bs{best_bs}"]["median_s"] / bf16_time
    headline = summary[f"lmeval_bs{best_bs}"]["median_s"] / ms_time
    accuracy = {
        "maskscope_fp32_vs_naive_max_abs_total": max_total_diff(ms_totals, totals(naive)),
        "maskscope_fp32_vs_naive_max_abs_token": max_token_diff(ms_fp32, naive),
        **{
            f"maskscope_fp32_vs_lmeval_bs{bs}_max_abs_total": max_total_diff(ms_totals, lmeval_totals[bs])
            for bs in batch_sizes
        },
        "naive_vs_lmeval_max_abs_total": max(
            max_total_diff(totals(naive), lmeval_totals[bs]) for bs in batch_sizes
        ),
        "maskscope_bf16_vs_fp32_max_abs_token": max_token_diff(ms_bf16, ms_fp32),
        "maskscope_bf16_vs_fp32_max_abs_total": max_total_diff(totals(ms_bf16), ms_totals),
        "maskscope_bf16_vs_fp32_mean_abs_token": statistics.fmean(
            abs(x - y) for ra, rb in zip(ms_bf16, ms_fp32, strict=True) for x, y in zip(ra, rb, strict=True)
        ),
    }
    return {
        "benchmark": "score_prefix",
        "machine": {**machine_info(), "load_average_per_round": loads},
        "model": model.name,
        "workload": {
            "shape": shape,
            **work,
            "spec": str(SPEC.relative_to(ROOT)),
            "continuations": list(workload.requests[0][1]),
            "tokens_per_s_counts": "total_tokens: prompt + continuation tokens of every request",
        },
        "timing": {
            "warmup": "each method once on the first 2 cells",
            "timed_runs": {name: m.repeats for name, m in methods.items()},
            "order": "interleaved: every method once per round",
            "statistic": "median wall time",
        },
        "lmeval_tokenization": token_check,
        "methods": summary,
        "ratios_wall_time": ratios,
        "headline": {
            "lmeval_best_batch_size": best_bs,
            "speedup_vs_lmeval_best": headline,
            "goal_speedup": 3.0,
            "goal_met": headline >= 3.0,
            "max_abs_logprob_diff_fp32": max(
                accuracy["maskscope_fp32_vs_naive_max_abs_total"],
                *(accuracy[f"maskscope_fp32_vs_lmeval_bs{bs}_max_abs_total"] for bs in batch_sizes),
            ),
            "goal_max_abs_logprob_diff": 1e-4,
        },
        "accuracy": accuracy,
    }


def print_table(res: dict[str, Any]) -> None:
    """A readable summary of a results dict."""
    w = res["workload"]
    print()
    print(
        f"Workload: {w['cells']} cells x {w['continuations_per_cell']} continuations = {w['requests']} requests, "
        f"{w['total_tokens']} tokens ({w['prompt_tokens']} prompt + {w['continuation_tokens']} continuation; "
        f"{w['multi_token_requests']} multi-token continuations)"
    )
    print(f"{'method':<24}{'median s':>10}{'tokens/s':>12}{'maskscope fp32 is x faster':>30}")
    ms = res["methods"]["maskscope_fp32"]["median_s"]
    for name, m in res["methods"].items():
        print(f"{name:<24}{m['median_s']:>10.3f}{m['tokens_per_s']:>12.0f}{m['median_s'] / ms:>30.2f}")
    h = res["headline"]
    a = res["accuracy"]
    print(
        f"\nHeadline: maskscope fp32 is {h['speedup_vs_lmeval_best']:.2f}x faster than lm-eval's best measured "
        f"setting (batch_size={h['lmeval_best_batch_size']}); goal 3x: {'met' if h['goal_met'] else 'NOT met'}"
    )
    print(
        f"fp32 max |summed logprob diff| vs naive and lm-eval: {h['max_abs_logprob_diff_fp32']:.2e} (goal 1e-4)"
    )
    print(
        f"bf16: {res['ratios_wall_time']['maskscope_bf16_vs_maskscope_fp32']:.2f}x the fp32 speed; "
        f"max |logprob diff| vs fp32: per token {a['maskscope_bf16_vs_fp32_max_abs_token']:.3f}, "
        f"summed {a['maskscope_bf16_vs_fp32_max_abs_total']:.3f}"
    )
    tc = res["lmeval_tokenization"]
    print(f"lm-eval token ids identical to maskscope's: {tc['pairs_with_identical_ids']}/{tc['pairs']} pairs")


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=3,
        help="timed runs of the naive loop and of lm-eval at batch size 1",
    )
    parser.add_argument("--lmeval-batch-sizes", default="1,32", help="comma-separated; 1 is HFLM's default")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--shape",
        choices=("grid", "short"),
        default="grid",
        help="grid: 30 cells x 12; short: 25 x 8 of 1-6 tokens",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/score_prefix[_short][_tN].json"
    )
    args = parser.parse_args()
    if args.out is None:
        suffix = ("" if args.shape == "grid" else "_short") + (f"_t{args.threads}" if args.threads else "")
        args.out = RESULTS / f"score_prefix{suffix}.json"
    batch_sizes = [int(x) for x in args.lmeval_batch_sizes.split(",")]
    res = run(args.repeats, args.slow_repeats, batch_sizes, args.threads, args.shape)
    write_json(args.out, res)
    print_table(res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
