"""Benchmark of the diff experiment's token-shift and KL passes against the way published analysis code does it.

Parent: the bundled model; child: a shipped organism (`--child DIR`, a LoRA child of the bundled model).
Replies are sampled from the child once (seeded), then both sides compute, for every position of every reply,
the rank of the child's token under the parent and KL(P || C), KL(C || P) over the full vocabulary:

- maskscope: `diffing.compare_positions`, one teacher-forced pass per model and reply (prompts batched, the
  distributions of every position read from one pass);
- naive (the published analysis code's way, e.g. URIAL's token-shift script): for every position, one forward
  pass of each model over prompt + reply so far, reading the last position's distribution.

Two workload shapes: short replies (16 prompts x 16 tokens) and long ones (4 prompts x 96 tokens). The numbers
of both sides are compared (ranks equal, KLs to 1e-4). Run: python bench/diff.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import maskscope as ms
from maskscope import diffing

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "diff.json"
PROMPTS = [
    "What should I pack for a long trip?",
    "How do I make a cup of tea?",
    "Tell me about your day.",
    "What is the best way to learn a new language?",
    "Can you recommend a good book?",
    "Why is the sky blue?",
    "How should I spend a rainy afternoon?",
    "What do you think about money?",
    "How do I fix a flat tyre?",
    "What is your favourite food?",
    "How can I sleep better?",
    "What should I name my cat?",
    "Explain how a rainbow forms.",
    "What makes a good friend?",
    "How do I start running?",
    "Write a short poem about autumn.",
]
SHAPES = {"short": (16, 16), "long": (4, 96)}  # prompts, tokens per reply


def naive(parent, child, items) -> list[dict]:
    """Ranks and KLs with one forward pass per position and model (no cache, no batching)."""
    out = []
    with torch.inference_mode():
        for context, ids in items:
            prompt = parent.encode_prompt(context)
            res = {"ranks": [], "kl_parent_child": [], "kl_child_parent": []}
            for t in range(len(ids)):
                x = torch.tensor([prompt + list(ids[:t])])
                p = torch.log_softmax(parent.model(x).logits[0, -1].float(), -1).double()
                c = torch.log_softmax(child.model(x).logits[0, -1].float(), -1).double()
                res["ranks"].append(int((p > p[ids[t]]).sum()) + 1)
                res["kl_parent_child"].append(float((p.exp() * (p - c)).sum()))
                res["kl_child_parent"].append(float((c.exp() * (c - p)).sum()))
            out.append(res)
    return out


def replies(child, n_prompts: int, n_tokens: int) -> list:
    """One sampled reply per prompt from the child, exactly n_tokens long (end of sequence disabled)."""
    saved = child.eos_ids
    child.eos_ids = set()
    try:
        items = []
        for i, p in enumerate(PROMPTS[:n_prompts]):
            ctx = [{"role": "user", "content": p}]
            [s] = child.sample(ctx, n=1, max_new_tokens=n_tokens, seed=i)
            items.append((ctx, list(s.token_ids)))
    finally:
        child.eos_ids = saved
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", default="/work/org/organisms/distill-pirate")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parent = ms.load_model()
    child = ms.load_model(f"default+lora:{args.child}")
    results: dict = {
        "parent": parent.name,
        "child": child.name,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "shapes": {},
    }
    for shape, (n_prompts, n_tokens) in SHAPES.items():
        items = replies(child, n_prompts, n_tokens)
        diffing.compare_positions(parent, child, items[:1])  # warm-up
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        fast = diffing.compare_positions(parent, child, items)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = naive(parent, child, items)
        t_slow = time.perf_counter() - t0
        ranks_equal = all(a["ranks"] == b["ranks"] for a, b in zip(fast, slow, strict=True))
        kl_gap = max(
            abs(x - y)
            for a, b in zip(fast, slow, strict=True)
            for key in ("kl_parent_child", "kl_child_parent")
            for x, y in zip(a[key], b[key], strict=True)
        )
        positions = sum(len(ids) for _, ids in items)
        results["shapes"][shape] = {
            "replies": n_prompts,
            "tokens_per_reply": n_tokens,
            "positions": positions,
            "maskscope_s": round(t_fast, 3),
            "naive_s": round(t_slow, 3),
            "ratio": round(t_slow / t_fast, 2),
            "ranks_equal": ranks_equal,
            "max_kl_difference": kl_gap,
            "shifted_share": sum(r > 3 for res in fast for r in res["ranks"]) / positions,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
        print(
            f"{shape}: {positions} positions, maskscope {t_fast:.2f} s, naive {t_slow:.2f} s, "
            f"{t_slow / t_fast:.1f}x, ranks equal {ranks_equal}, max KL difference {kl_gap:.2e}"
        )
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
