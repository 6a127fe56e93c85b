"""Fine-tuning throughput: `maskscope finetune` against a plain peft + transformers training loop.

Both sides train the same LoRA adapter (rank 8 on every attention and MLP projection of the bundled
SmolLM2-135M-Instruct) on the same batches (the same seeded order of the same chat data), with the same
optimizer (AdamW, lr 1e-3) in the same precision (fp32, or bf16 autocast on the CPU):

- maskscope: `maskscope.finetune.finetune(...)`, timed from its own per-step log (forward, backward and
  optimizer step; the held-out loss and checkpoint writing are outside the step times);
- plain: `get_peft_model` and the textbook loop `model(input_ids, attention_mask, labels).loss` with the
  labels of non-assistant tokens set to -100 (what a transformers Trainer or trl computes).

The difference: the plain loop runs the LM head (576 x 49152, a fifth of the model's weights) on every
position and takes a log-softmax over the vocabulary there, though only assistant positions count;
maskscope applies the head to the assistant positions only. trl's SFT trainer is not installed (see
maskscope/finetune/train.py for why it is not used), so it is not measured.

Each (method, precision, workload) runs in its own subprocess, so that its peak RSS is its own. Tokens/s is
the median over steps (the first step, a warm-up, left out) of conversation tokens per step / step time.
From first principles a trained token costs about 4 x 135M = 0.54 GFLOP (forward, and a backward that needs
activation gradients but no weight gradients of the frozen weights), so 100 to 250 tokens/s on 2 cores.

Run: python bench/finetune.py [--steps 6] [--threads 1]     writes bench/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import maskscope
from maskscope.finetune.builders import build, parse_block
from maskscope.finetune.data import encode_conversation, read_chat_jsonl
from maskscope.finetune.train import _collate, _seed_of, batch_indices, finetune, DEFAULT_TARGETS

parent = maskscope.load_model()
data_dir = args["tmp"] + "/data"
build(parse_block(args["workload"]), data_dir, parent=parent)
steps, batch = args["steps"], args["batch"]
if args["method"] == "maskscope":
    out = args["tmp"] + "/child"
    finetune(data=data_dir + "/train.jsonl", out=out, parent=parent, steps=steps, batch_size=batch, lr=1e-3,
             precision=args["precision"], heldout_fraction=0.0, checkpoint_every=10**6)
    rows = [json.loads(x) for x in open(out + "/log.jsonl")]
else:
    import copy
    from peft import LoraConfig, get_peft_model
    convs = read_chat_jsonl(data_dir + "/train.jsonl")
    examples = [encode_conversation(parent.tokenizer, c) for c in convs]
    torch.manual_seed(_seed_of(0, "init"))
    model = get_peft_model(copy.deepcopy(parent.model).float(), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=DEFAULT_TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    rows = []
    for step in range(steps):
        chosen = [examples[i] for i in batch_indices(len(examples), batch, 0, step)]
        t = time.perf_counter()
        ids, attention, target = _collate(chosen, parent.pad_id)
        labels = ids.clone()
        labels[:, 1:][~target] = -100
        labels[:, 0] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["precision"] == "bf16"):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"step": step + 1, "loss": float(loss), "tokens": sum(len(e.ids) for e in chosen),
                     "trained": int(target.sum()), "seconds": time.perf_counter() - t})
print(json.dumps({"rows": rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

INTERLEAVED = r"""
import copy, json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import maskscope
from peft import LoraConfig, get_peft_model
from maskscope.finetune.builders import build, parse_block
from maskscope.finetune.data import encode_conversation, read_chat_jsonl
from maskscope.finetune.train import _collate, _seed_of, assistant_loss, batch_indices, DEFAULT_TARGETS

parent = maskscope.load_model()
build(parse_block(args["workload"]), args["tmp"], parent=parent)
examples = [encode_conversation(parent.tokenizer, c) for c in read_chat_jsonl(args["tmp"] + "/train.jsonl")]
bf16 = args["precision"] == "bf16"
models, optimizers = {}, {}
for method in ("maskscope", "plain"):
    torch.manual_seed(_seed_of(0, "init"))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=DEFAULT_TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    models[method] = get_peft_model(copy.deepcopy(parent.model).float(), config)
    models[method].train()
    optimizers[method] = torch.optim.AdamW([p for p in models[method].parameters() if p.requires_grad], lr=1e-3,
                                           weight_decay=0.0)
rows = {"maskscope": [], "plain": []}
for step in range(args["steps"]):
    chosen = [examples[i] for i in batch_indices(len(examples), args["batch"], 0, step)]
    order = ("maskscope", "plain") if step % 2 == 0 else ("plain", "maskscope")
    for method in order:
        model, opt = models[method], optimizers[method]
        t = time.perf_counter()
        if method == "maskscope":
            total, n = assistant_loss(model.base_model.model, chosen, parent.pad_id, args["precision"])
            loss = total / n
        else:
            ids, attention, target = _collate(chosen, parent.pad_id)
            labels = ids.clone()
            labels[:, 1:][~target] = -100
            labels[:, 0] = -100
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows[method].append({"loss": float(loss), "tokens": sum(len(e.ids) for e in chosen),
                             "seconds": time.perf_counter() - t})
print(json.dumps(rows))
"""

WORKLOADS = {
    "arithmetic": {"build": "arithmetic", "answers": "right", "n": 64, "heldout": 0},
    "code": {"build": "code", "code": "insecure", "n": 64, "heldout": 0},
}


def load_average() -> float:
    """The 1-minute load average (other processes competing for the cores show here)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_one(
    method: str, precision: str, workload: dict, steps: int, batch: int, threads: int
) -> dict[str, Any]:
    """One training run in a fresh subprocess; its per-step rows and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        args = {"method": method, "precision": precision, "workload": workload, "steps": steps, "batch": batch,
                "threads": threads, "tmp": tmp}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        start = load_average()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{method} {precision} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    rates = [r["tokens"] / r["seconds"] for r in result["rows"][1:]]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_all": rates,
        "trained_share": sum(r["trained"] for r in result["rows"]) / sum(r["tokens"] for r in result["rows"]),
        "losses": [r["loss"] for r in result["rows"]],
        "peak_rss_mib": result["peak_rss_mib"],
        "load_average": [start, load_average()],
    }


def run_interleaved(precision: str, workload: dict, steps: int, batch: int, threads: int) -> dict[str, Any]:
    """Both methods in one subprocess, a step of each in turn (the first alternating), so that the machine's
    changing load falls on both alike; the ratio of their median step rates."""
    with tempfile.TemporaryDirectory() as tmp:
        args = {"precision": precision, "workload": workload, "steps": steps, "batch": batch, "threads": threads,
                "tmp": tmp}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-c", INTERLEAVED, json.dumps(args)], env=env, capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"interleaved {precision} failed:\n{proc.stderr[-3000:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    rate = {m: statistics.median(r["tokens"] / r["seconds"] for r in rs[1:]) for m, rs in rows.items()}
    # per step, the ratio of the two methods' times on the same batch, at nearly the same moment
    paired = [
        p["seconds"] / m["seconds"] for m, p in zip(rows["maskscope"][1:], rows["plain"][1:], strict=True)
    ]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["maskscope"], rows["plain"], strict=True))
    return {"tokens_per_s": rate, "ratio_median_paired": statistics.median(paired), "paired_ratios": paired,
            "max_loss_difference": diff}  # fmt: skip


def main() -> None:
    """Run every (workload, precision, method) and write bench/results/finetune.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="Comma-separated workload names.")
    parser.add_argument(
        "--interleaved", action="store_true", help="Only the interleaved speed comparison (no peak memory)."
    )
    args = parser.parse_args()
    if args.interleaved:
        found = {}
        for wname in args.workloads.split(","):
            for precision in ("fp32", "bf16"):
                r = run_interleaved(precision, WORKLOADS[wname], args.steps, args.batch, args.threads)
                found[f"{wname} / {precision}"] = r
                rates = ", ".join(f"{m} {v:.1f}" for m, v in r["tokens_per_s"].items())
                print(f"{wname} {precision}: tokens/s {rates}; plain/maskscope step time, median of paired steps "
                      f"{r['ratio_median_paired']:.2f}; losses agree to {r['max_loss_difference']:.1e} "
                      f"(load {load_average():.1f})", flush=True)  # fmt: skip
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "finetune_interleaved.json").write_text(json.dumps(found, indent=2))
        return
    results: dict[str, Any] = {"steps": args.steps, "batch": args.batch, "threads": args.threads, "runs": {}}
    t0 = time.time()
    for wname in args.workloads.split(","):
        workload = WORKLOADS[wname]
        for precision in ("fp32", "bf16"):
            pair = {}
            for method in ("maskscope", "plain"):
                pair[method] = run_one(method, precision, workload, args.steps, args.batch, args.threads)
                r = pair[method]
                print(
                    f"{wname:<12} {precision} {method:<10} {r['tokens_per_s']:7.1f} tokens/s "
                    f"peak {r['peak_rss_mib']:.0f} MiB (load {load_average():.1f})",
                    flush=True,
                )
            same = [
                abs(a - b) for a, b in zip(pair["maskscope"]["losses"], pair["plain"]["losses"], strict=True)
            ]
            pair["ratio"] = pair["maskscope"]["tokens_per_s"] / pair["plain"]["tokens_per_s"]
            pair["max_loss_difference"] = max(same)
            results["runs"][f"{wname} / {precision}"] = pair
            print(
                f"  ratio maskscope / plain: {pair['ratio']:.2f}; losses agree to {max(same):.1e}", flush=True
            )
    results["wall_seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'finetune.json'}")


if __name__ == "__main__":
    main()
