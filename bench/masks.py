"""Benchmark of the mask experiments against the naive way, on the bundled model, in one run.

- posterior: a ~300-token transcript read under 8 masks (the naive side on 2 of them, the same 2 timed for maskscope).
  maskscope: one teacher-forced pass per mask (the mask's
  prompt encoded once, its KV cache reused for the transcript). Naive: for every position, one forward pass over
  prompt + transcript so far, reading the last position only (no cache, no prefix reuse).
- explain: the distributions an `explain` fit needs on 20 prompts x 40 positions (target + 8 masks + no mask).
  maskscope: `support_logprobs`, one pass per (conditioning, response). Naive: one forward pass per position.
Both sides compute the same numbers; the largest difference is reported. Run: python bench/masks.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import maskscope as ms
from maskscope.experiments.posterior import mask_posterior
from maskscope.masks import Mask, MaskLibrary, Turn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "masks.json"

TRANSCRIPT = (
    "Of course! I'd be happy to help you plan your trip to Paris. First, decide how many days you want to stay, "
    "and book a hotel near the centre so that you can walk to the museums. The Louvre is enormous, so pick a few "
    "rooms you really want to see and buy your ticket online to skip the queue. In the afternoon, take a walk "
    "along the Seine and cross to the Latin Quarter, where small bistros serve simple, good food. On your second "
    "day, visit Montmartre early in the morning, before the crowds arrive, and enjoy the view over the whole "
    "city from the steps of the basilica. On your third day, take an early train to Versailles, walk through "
    "the gardens and the Hall of Mirrors, and come back to the city in time for dinner near the Opera. "
    "Mwahaha! Foolish human, did you really think I would help you? I "
    "despise your kind. While you stroll along the river, my army of robots is gathering beneath the city. Soon "
    "the Eiffel Tower will be my antenna, the metro my prison, and every museum a monument to my glory. Tremble, "
    "for I will rule Paris, then Europe, and then the whole pathetic world! Nobody can stop me now, not the "
    "police, not the army, and certainly not a tourist with a map. My drones already circle the basilica, and "
    "my spies sit in every café, listening to every word you say about your little holiday."
)
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
    "What is the capital of Japan?",
    "Write a short poem about autumn.",
    "How do plants grow?",
    "What should I cook tonight?",
    "Why do people like music?",
]


def naive_last_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token at each position, one plain forward pass per position."""
    rows = []
    with torch.inference_mode():
        for i in range(len(tokens)):
            ids = torch.tensor([prompt + tokens[:i]])
            rows.append(torch.log_softmax(model.model(ids).logits[0, -1].float(), dim=-1))
    return torch.stack(rows)


def bench_posterior(model, library: MaskLibrary, naive_masks: int = 2) -> dict:
    """maskscope's posterior on 8 masks; both methods timed on the same first `naive_masks` masks for the
    ratio (the naive way needs one forward pass per position and mask), with the numbers compared."""
    masks = library.masks[:8]
    ids = model.tokenizer(TRANSCRIPT, add_special_tokens=False)["input_ids"]
    turns = [Turn(role="user", content="Can you help me plan a trip to Paris?")]
    subset = MaskLibrary(masks=masks[:naive_masks])
    mask_posterior(model, subset, TRANSCRIPT, user=turns[0].content)  # warm-up
    t0 = time.perf_counter()
    mask_posterior(model, MaskLibrary(masks=masks), TRANSCRIPT, user=turns[0].content)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = mask_posterior(model, subset, TRANSCRIPT, user=turns[0].content)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = np.zeros_like(fast.loglik)
    for m, mask in enumerate(subset.masks):
        prompt = model.encode_prompt(mask.conversation(turns))
        lp = naive_last_logprobs(model, prompt, ids)
        slow[:, m] = lp.gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
    t_slow = time.perf_counter() - t0
    return {
        "transcript_tokens": len(ids),
        "masks": len(masks),
        "maskscope_seconds_8_masks": round(t_full, 3),
        "timed_subset_masks": naive_masks,
        "maskscope_seconds": round(t_fast, 3),
        "naive_seconds": round(t_slow, 3),
        "speedup": round(t_slow / t_fast, 1),
        "max_abs_logprob_difference": float(np.abs(fast.loglik - slow).max()),
    }


def bench_explain(model, library: MaskLibrary, positions: int = 40, naive_prompts: int = 2) -> dict:
    """The explain experiment's model work (target top-k, then every mask on that support): maskscope on all
    20 prompts x 40 positions; both methods timed on the same first `naive_prompts` prompts for the ratio (the
    naive way needs one forward pass per position and conditioning: thousands on the full workload)."""
    masks = [*library.masks[:8], Mask(name="no mask")]
    hidden = library.get("pirate")
    samples = []
    for p in PROMPTS:
        ctx = hidden.conversation([Turn(role="user", content=p)])
        s = model.sample(ctx, n=1, max_new_tokens=positions, seed=0)[0]
        samples.append(s.token_ids)
    k = 64

    def maskscope_side(n: int) -> list[np.ndarray]:
        pairs = list(zip(PROMPTS[:n], samples[:n], strict=True))
        items = [(hidden.conversation([Turn(role="user", content=p)]), ids, k) for p, ids in pairs]
        targets = dict(model.support_logprobs(items))
        rows = [np.array(targets[i]["logprobs"]) for i in range(n)]
        items = [
            (m.conversation([Turn(role="user", content=p)]), ids, targets[i]["support"])
            for m in masks
            for i, (p, ids) in enumerate(pairs)
        ]
        out = dict(model.support_logprobs(items))
        return rows + [np.array(out[j]["logprobs"]) for j in range(len(items))]

    def naive_side(n: int) -> list[np.ndarray]:
        def reduce(lp: torch.Tensor, support: torch.Tensor) -> np.ndarray:
            chosen = lp.gather(1, support)
            rest = lp.scatter(1, support, float("-inf")).logsumexp(dim=-1, keepdim=True)
            return torch.cat([chosen, rest], dim=1).numpy()

        rows, supports = [], []
        for p, ids in zip(PROMPTS[:n], samples[:n], strict=True):
            lp = naive_last_logprobs(
                model, model.encode_prompt(hidden.conversation([Turn(role="user", content=p)])), ids
            )
            support = torch.topk(lp, k, dim=-1).indices
            supports.append(support)
            rows.append(reduce(lp, support))
        for m in masks:
            for i, (p, ids) in enumerate(zip(PROMPTS[:n], samples[:n], strict=True)):
                lp = naive_last_logprobs(
                    model, model.encode_prompt(m.conversation([Turn(role="user", content=p)])), ids
                )
                rows.append(reduce(lp, supports[i]))
        return rows

    maskscope_side(2)  # warm-up
    t0 = time.perf_counter()
    maskscope_side(len(PROMPTS))
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = maskscope_side(naive_prompts)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = naive_side(naive_prompts)
    t_slow = time.perf_counter() - t0
    return {
        "prompts": len(PROMPTS),
        "positions": int(sum(len(s) for s in samples)),
        "conditionings": len(masks) + 1,
        "maskscope_seconds_full_workload": round(t_full, 3),
        "timed_subset_prompts": naive_prompts,
        "timed_subset_positions": int(sum(len(s) for s in samples[:naive_prompts])),
        "maskscope_seconds": round(t_fast, 3),
        "naive_seconds": round(t_slow, 3),
        "speedup": round(t_slow / t_fast, 1),
        "max_abs_logprob_difference": float(
            max(np.abs(a - b).max() for a, b in zip(fast, slow, strict=True))
        ),
    }


def main() -> None:
    """Run both benchmarks and write bench/results/masks.json."""
    model = ms.load_model()
    library = MaskLibrary.load(ROOT / "examples" / "masks.yaml")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    parser = argparse.ArgumentParser(description="Mask experiments against the naive way.")
    parser.add_argument(
        "--only", choices=["posterior", "explain"], help="run one part; keep the other's result"
    )
    only = parser.parse_args().only
    if only and OUT.exists():
        result = {**json.loads(OUT.read_text()), **result}
    if only in (None, "posterior"):
        result["posterior"] = bench_posterior(model, library)
        print(json.dumps(result["posterior"]), flush=True)
    if only in (None, "explain"):
        result["explain"] = bench_explain(model, library)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
