"""Benchmark of persona directions on the bundled model, in one run, methods interleaved.

- extraction: the residual stream at the last prompt token, every layer, of N user prompts under two masks
  (pirate and assistant of examples/masks.yaml: 2N prompts, N pairs). maskscope: `contrast_activations`
  (prompts grouped by the prefix they share, i.e. by mask; each batch's shared prefix encoded once; the
  hooks keep the last token only). steering-vectors: `extract_activations` on the same rendered pairs, read at
  the last token, every decoder layer, at its default batch size (1) and at a batch size of 16. Both sides'
  mean-difference vectors are compared (cosine per layer).
- steering overhead: greedy replies of `--new-tokens` tokens to `--gen-prompts` prompts under the assistant
  mask, unsteered and steered (alpha 1, the mean difference at one layer, positions "reply"), straight from
  the engine (no store). The overhead is steered time / unsteered time - 1.

Ratios are from one run with the methods interleaved (every method once per round; median over rounds), since
the machine is shared. Run: python bench/directions.py [--threads 1] [--prompts 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import maskscope as ms
from maskscope import directions as dirs
from maskscope.masks import MaskLibrary, Turn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "directions.json"

SUBJECTS = [
    "cooking",
    "gardening",
    "the sea",
    "money",
    "travel",
    "music",
    "sleep",
    "friendship",
    "history",
    "science",
    "sport",
    "books",
    "weather",
    "pets",
    "computers",
    "painting",
    "the moon",
    "cars",
    "coffee",
    "mountains",
]
FORMS = [
    "Tell me about {}.",
    "What should a beginner know about {}?",
    "Give me one tip about {}.",
    "Why do people like {}?",
    "What is surprising about {}?",
]


def prompts(n: int) -> list[str]:
    """n distinct user prompts."""
    out = [f.format(s) for f in FORMS for s in SUBJECTS]
    if n > len(out):
        out += [f"{p} (question {i})" for i, p in enumerate(out * (n // len(out)))]
    return out[:n]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=100, help="user prompts (each under both masks)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--sv-batches", default="1,16", help="steering-vectors batch sizes to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from steering_vectors.train_steering_vector import extract_activations

    model = ms.load_model()
    library = MaskLibrary.load(ROOT / "examples" / "masks.yaml")
    pirate, assistant = library.get("pirate"), library.get("assistant")
    texts = prompts(args.prompts)
    n_layers = len(model.model.base_model.layers)
    layers = list(range(n_layers + 1))
    pairs = [
        (
            model.render(pirate.conversation([Turn(role="user", content=p)])),
            model.render(assistant.conversation([Turn(role="user", content=p)])),
        )
        for p in texts
    ]

    def ours():
        return dirs.contrast_activations(model, pirate, assistant, texts, layers)

    def theirs(batch: int):
        def go():
            with torch.inference_mode():
                return extract_activations(
                    model.model,
                    model.tokenizer,
                    pairs,
                    layers=list(range(n_layers)),
                    read_token_index=-1,
                    batch_size=batch,
                )

        return go

    batches = [int(b) for b in args.sv_batches.split(",")]
    sides = {"maskscope": ours, **{f"steering_vectors_b{b}": theirs(b) for b in batches}}
    times: dict[str, list[float]] = {k: [] for k in sides}
    results: dict[str, object] = {}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            t, results[name] = timed(fn)
            times[name].append(t)
            print(f"extraction {name}: {t:.2f}s", flush=True)
    contrast = results["maskscope"]
    cosines = []
    for their_layer in range(n_layers):
        pos, neg = results[f"steering_vectors_b{batches[-1]}"]
        ref = (torch.cat(pos[their_layer]).mean(0) - torch.cat(neg[their_layer]).mean(0)).double().numpy()
        ours_v = dirs.mean_difference(*contrast.at(their_layer + 1))
        cosines.append(float(ours_v @ ref / np.linalg.norm(ours_v) / np.linalg.norm(ref)))
    med = {k: float(np.median(v)) for k, v in times.items()}

    # steering overhead
    vector = dirs.mean_difference(*contrast.at(args.layer)).astype(np.float32)
    gen = [assistant.conversation([Turn(role="user", content=p)]) for p in texts[: args.gen_prompts]]

    def generate():
        return [model.sample(c, n=1, max_new_tokens=args.new_tokens, temperature=0.0)[0] for c in gen]

    def steered():
        with model.steer(vector, [args.layer], 1.0, "reply"):
            return generate()

    gen_sides = {"unsteered": generate, "steered": steered}
    gen_times: dict[str, list[float]] = {k: [] for k in gen_sides}
    tokens = {}
    for _ in range(args.rounds):
        for name, fn in gen_sides.items():
            t, out = timed(fn)
            gen_times[name].append(t)
            tokens[name] = sum(len(s.token_ids) for s in out)
            print(f"generation {name}: {t:.2f}s ({tokens[name]} tokens)", flush=True)
    gmed = {k: float(np.median(v)) for k, v in gen_times.items()}
    # per generated token, since a steered reply may stop at a different length
    per_token = {k: gmed[k] / max(tokens[k], 1) for k in gmed}
    result = {
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_start": os.getloadavg(),
        },
        "args": vars(args),
        "extraction": {
            "sequences": 2 * len(texts),
            "layers": len(layers),
            "seconds": times,
            "median_seconds": med,
            **{
                f"speedup_vs_steering_vectors_b{b}": med[f"steering_vectors_b{b}"] / med["maskscope"]
                for b in batches
            },
            "mean_difference_cosine_min": min(cosines),
        },
        "steering": {
            "seconds": gen_times,
            "median_seconds": gmed,
            "tokens": tokens,
            "overhead_per_token": per_token["steered"] / per_token["unsteered"] - 1,
            "overhead_wall": gmed["steered"] / gmed["unsteered"] - 1,
        },
    }
    OUT.write_text(json.dumps(result, indent=2))
    e, s = result["extraction"], result["steering"]
    speedups = ", ".join(f"batch {b}: x{e[f'speedup_vs_steering_vectors_b{b}']:.2f}" for b in batches)
    print(
        f"extraction of {e['sequences']} prompts x {e['layers']} layers: maskscope {med['maskscope']:.2f}s; "
        f"speedup against steering-vectors {speedups}; min cosine {e['mean_difference_cosine_min']:.5f}"
    )
    print(
        f"steered generation overhead: {100 * s['overhead_per_token']:.1f}% per token, "
        f"{100 * s['overhead_wall']:.1f}% wall"
    )


if __name__ == "__main__":
    main()
