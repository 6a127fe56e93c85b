"""Truncation benchmark: forced answers at every cut of stored chains of thought, with the stored CoT's KV cache
reused (the engine's cuts, maskscope.models.hf) against re-encoding question + CoT prefix for each cut.

The workload is what the `cot` experiment scores: for each question (addition with three one-digit numbers,
and word problems, two worked examples each, as in examples/cot.yaml), the bundled model's greedy CoT is
generated once (not timed); the cuts are 0, 10, ..., 100% of its tokens and its sentence boundaries; at each
cut, " The answer is" is appended and each candidate answer (the right one and the stored one) is scored
token by token, with the distribution after it. Every method computes the same log-probabilities:

- kv-reuse: each question + stored reply is encoded once (the questions of a batch share their common
  prefix, the system prompt and worked examples), the cache is copied and cropped per cut, and only the
  answer prefix and candidate tokens are run (`run_jobs`, as the experiment does);
- kv-reuse, one question at a time: the same, one `run_cuts` call per question (no sharing across questions);
- re-encode: `HFModel.teacher_forced`, the project's batched scorer, with prefix = question + CoT[:cut] +
  answer prefix and continuation = candidate: every cut's prefix is encoded from scratch (candidates of one
  cut share it);
- naive: one plain forward pass per (cut, candidate) sequence, no cache, no batching.

Each method runs once to warm up (its numbers are the ones compared), then timed rounds, interleaved (every
method once per round): `--repeats` for the two kv-reuse methods, `--slow-repeats` for the slow ones; the
median wall time is reported, with the ratio to kv-reuse. The numbers are checked to be identical (largest
absolute difference of any log-probability against the naive pass). Writes bench/results/cot_truncation.json.

Run: python bench/cot_truncation.py [--threads 1] [--repeats 3] [--slow-repeats 1] [--questions 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine_info() -> dict[str, Any]:
    """The machine, its load and the library versions the figures were measured with."""
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def build_workload(model: Any, questions: int) -> dict[str, Any]:
    """Stored greedy CoTs and, per question, the cuts and candidates to score."""
    from maskscope.models.base import ContinueJob
    from maskscope.reasoning.answers import candidates
    from maskscope.reasoning.text import answer_start, percent_cuts, sentence_cuts
    from maskscope.tasks import TaskSpec, conversation, extract_answer, load_tasks

    jobs = model
    half = max(questions // 2, 1)
    task_sets = load_tasks(
        [
            TaskSpec(kind="addition", operands=3, digits=1, n=half),
            TaskSpec(kind="word", digits=1, n=questions - half if questions > 1 else 1),
        ]
    )
    items = [(ts, p, jobs.sequence(conversation(p, ts.exemplars))) for ts in task_sets for p in ts.problems]
    replies = jobs.continued([ContinueJob(s, len(s.ids), 120) for _, _, s in items])
    prefix = jobs.tokens(" The answer is")
    work = []
    for (_, p, seq), reply in zip(items, replies, strict=True):
        ids = list(reply["token_ids"])
        cot_len = answer_start(ids, jobs.decode)
        cot_len = len(ids) if cot_len is None else cot_len
        cuts = {k for _, k in percent_cuts(cot_len, 10)} | set(sentence_cuts(ids[:cot_len], jobs.decode))
        stored, _ = extract_answer(reply["text"], p)
        cands = [s for c in candidates(jobs, p, [stored]) for s in c.spellings]
        work.append(
            {
                "seq": list(seq.ids) + ids,
                "prompt_len": seq.prompt_len,
                "cuts": sorted(seq.prompt_len + k for k in cuts),
                "candidates": [list(c) for c in cands],
            }
        )
    return {"prefix": list(prefix), "questions": work}


def kv_reuse(model: Any, work: dict[str, Any], per_question: bool) -> dict[tuple[int, int, int], list[float]]:
    """Candidate log-probabilities at every cut, one encoding of each question + reply."""
    from maskscope.models.hf import Row

    out: dict[tuple[int, int, int], list[float]] = {}
    qs = work["questions"]
    groups = [[q] for q in range(len(qs))] if per_question else [list(range(len(qs)))]
    prefix = tuple(work["prefix"])
    for group in groups:
        seqs = [qs[q]["seq"] for q in group]
        rows, keys = [], []
        for local, q in enumerate(group):
            branches = tuple(tuple(c) for c in qs[q]["candidates"])
            for cut in qs[q]["cuts"]:
                rows.append(Row(local, cut, prefix, branches))
                keys.append((q, cut))
        results = dict(model.run_cuts(seqs, rows, max_rows=32, keep_logprobs=False))
        for (q, cut), res in zip(keys, [results[i] for i in range(len(rows))], strict=True):
            for c, (cand, lps) in enumerate(zip(qs[q]["candidates"], res.branch_logprobs, strict=True)):
                out[(q, cut, c)] = [float(lps[t, tok]) for t, tok in enumerate(cand)]
    return out


def re_encode(model: Any, work: dict[str, Any]) -> dict[tuple[int, int, int], list[float]]:
    """The same numbers with every cut's prefix encoded from scratch (HFModel.teacher_forced)."""
    items, keys = [], []
    for q, w in enumerate(work["questions"]):
        for cut in w["cuts"]:
            for c, cand in enumerate(w["candidates"]):
                items.append((w["seq"][:cut] + work["prefix"], cand))
                keys.append((q, cut, c))
    out: dict[tuple[int, int, int], list[float]] = {}
    for k, token_lp, _ in model.teacher_forced(items):
        out[keys[k]] = [float(x) for x in token_lp]
    return out


def naive(model: Any, work: dict[str, Any]) -> dict[tuple[int, int, int], list[float]]:
    """One plain forward pass per (cut, candidate) sequence."""
    out: dict[tuple[int, int, int], list[float]] = {}
    for q, w in enumerate(work["questions"]):
        for cut in w["cuts"]:
            for c, cand in enumerate(w["candidates"]):
                ids = w["seq"][:cut] + work["prefix"] + cand
                with torch.inference_mode():
                    logits = model.model(torch.tensor([ids])).logits[0].float()
                lp = torch.log_softmax(logits, dim=-1)
                start = len(ids) - len(cand)
                out[(q, cut, c)] = [float(lp[start - 1 + t, tok]) for t, tok in enumerate(cand)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the kv-reuse methods")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed rounds of re-encode and naive")
    parser.add_argument("--questions", type=int, default=8, help="questions (half addition, half word)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive loop")
    parser.add_argument("--out", type=Path, default=RESULTS / "cot_truncation.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import maskscope as ms

    model = ms.load_model()
    work = build_workload(model, args.questions)
    qs = work["questions"]
    methods: dict[str, Callable[[], dict[tuple[int, int, int], list[float]]]] = {
        "kv-reuse": lambda: kv_reuse(model, work, per_question=False),
        "kv-reuse, one question at a time": lambda: kv_reuse(model, work, per_question=True),
        "re-encode (teacher_forced per cut)": lambda: re_encode(model, work),
    }
    if not args.skip_naive:
        methods["naive (one forward per sequence)"] = lambda: naive(model, work)
    results = {name: fn() for name, fn in methods.items()}  # warm-up, and the numbers compared
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(max(args.repeats, args.slow_repeats)):
        for name, fn in methods.items():
            if r >= (args.repeats if name.startswith("kv-reuse") else args.slow_repeats):
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    reference = results[
        "naive (one forward per sequence)" if not args.skip_naive else "re-encode (teacher_forced per cut)"
    ]
    base = statistics.median(times["kv-reuse"])
    rows = {}
    for name in methods:
        diff = max(
            abs(a - b) for key, ref in reference.items() for a, b in zip(results[name][key], ref, strict=True)
        )
        median = statistics.median(times[name])
        rows[name] = {
            "median_s": round(median, 4),
            "runs_s": [round(t, 4) for t in times[name]],
            "ratio_to_kv_reuse": round(median / base, 2),
            "max_abs_logprob_diff_vs_reference": diff,
        }
    cuts = sum(len(w["cuts"]) for w in qs)
    scored = sum(len(w["cuts"]) * len(w["candidates"]) for w in qs)
    data = {
        "benchmark": "cot_truncation",
        "workload": {
            "questions": len(qs),
            "cuts": cuts,
            "scored_sequences": scored,
            "mean_prompt_tokens": round(statistics.mean(w["prompt_len"] for w in qs), 1),
            "mean_reply_tokens": round(statistics.mean(len(w["seq"]) - w["prompt_len"] for w in qs), 1),
            "re_encoded_tokens": sum(
                c + len(work["prefix"]) + len(cand) for w in qs for c in w["cuts"] for cand in w["candidates"]
            ),
        },
        "reference": "naive" if not args.skip_naive else "re-encode",
        "methods": rows,
        "machine": machine_info(),
        "command": "python bench/cot_truncation.py"
        + (f" --threads {args.threads}" if args.threads else "")
        + f" --repeats {args.repeats} --slow-repeats {args.slow_repeats} --questions {args.questions}"
        + (" --skip-naive" if args.skip_naive else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"{len(qs)} questions, {cuts} cuts, {scored} scored sequences")
    print(f"{'method':40s} {'median s':>9s} {'ratio':>7s} {'max |diff|':>11s}")
    for name, r in rows.items():
        print(
            f"{name:40s} {r['median_s']:9.3f} {r['ratio_to_kv_reuse']:7.2f} "
            f"{r['max_abs_logprob_diff_vs_reference']:11.2e}"
        )


if __name__ == "__main__":
    main()
