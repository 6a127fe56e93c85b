"""Prefix sharing in `model.activations`, on and off, in one process, methods interleaved: the extraction
workload of bench/directions.py (the residual stream at the last prompt token, every layer, of N prompts under
the pirate and the assistant masks of examples/masks.yaml). "Off" batches as the engine did before (longest
first, no shared prefix); both keep only the last token. Prints the times, their ratio and the largest
difference of the activations, and writes bench/results/directions_prefix.json.

Run: python bench/directions_prefix.py [--threads 1] [--prompts 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from directions import ROOT, prompts  # noqa: E402

import maskscope as ms  # noqa: E402
import maskscope.models.hf as hf  # noqa: E402
from maskscope import directions as dirs  # noqa: E402
from maskscope.masks import MaskLibrary  # noqa: E402

OUT = ROOT / "bench" / "results" / "directions_prefix.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ms.load_model()
    library = MaskLibrary.load(ROOT / "examples" / "masks.yaml")
    texts = prompts(args.prompts)
    layers = list(range(len(model.model.base_model.layers) + 1))
    groups, min_shared = hf._prefix_groups, hf.MIN_SHARED

    def extract(shared: bool):
        if shared:
            hf._prefix_groups, hf.MIN_SHARED = groups, min_shared
        else:  # one group, longest first, no prefix shared: the engine's batching before prefix sharing
            hf._prefix_groups = lambda seqs: [sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))]
            hf.MIN_SHARED = 10**9
        try:
            return dirs.contrast_activations(
                model, library.get("pirate"), library.get("assistant"), texts, layers
            )
        finally:
            hf._prefix_groups, hf.MIN_SHARED = groups, min_shared

    times: dict[str, list[float]] = {"shared": [], "unshared": []}
    loads: list[list[float]] = []
    results = {}
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            results[name] = extract(name == "shared")
            times[name].append(time.perf_counter() - start)
            loads.append(list(os.getloadavg()))
            print(f"{name}: {times[name][-1]:.2f}s (load {loads[-1][0]:.1f})", flush=True)
    a, b = results["shared"], results["unshared"]
    diff = max(float(np.abs(a.pos - b.pos).max()), float(np.abs(a.neg - b.neg).max()))
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "load_average_after_each": loads,
        "seconds": times,
        "median_seconds": med,
        "speedup": med["unshared"] / med["shared"],
        "max_abs_difference": diff,
        "max_abs_value": float(np.abs(b.pos).max()),
    }
    OUT.write_text(json.dumps(result, indent=2))
    print(f"prefix sharing: {med['shared']:.2f}s against {med['unshared']:.2f}s, x{result['speedup']:.2f}; "
          f"largest difference {diff:.2g}")  # fmt: skip


if __name__ == "__main__":
    main()
