"""Start-up benchmark: `maskscope score "Hi" no` end to end (process start to printed result) against a plain
transformers script that does the same from the cached safetensors directory.

Both are fresh processes on a warm cache (the dequantized bundled model exists; the OS page cache is not
dropped). The plain script is what a user would write: load tokenizer and model with `from_pretrained`,
render the chat template, one forward pass, print log P("no"). maskscope also hashes-checks nothing new, renders
the same prompt, probes its LM-head path and prints the same number. Rounds alternate the two commands; the
median wall time is reported. Writes bench/results/startup.json.

Run: python bench/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from score_prefix import RESULTS, ROOT, load_average, machine_info, write_json

PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
ids = tok(prompt + "no", add_special_tokens=False, return_tensors="pt").input_ids
with torch.inference_mode():
    lp = torch.log_softmax(model(ids).logits[0, -2].float(), -1)[ids[0, -1]]
print(f"no {float(lp):.6f}")
"""


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from maskscope.models.loading import bundled_gguf_path, dequantized_dir

    directory, _ = dequantized_dir(bundled_gguf_path())
    maskscope_bin = Path(sys.executable).parent / "maskscope"
    commands = {
        "maskscope": [str(maskscope_bin), "score", "Hi", "no"],
        "plain_transformers": [sys.executable, "-c", PLAIN, str(directory)],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    outputs: dict[str, str] = {}
    loads = []
    for _ in range(args.repeats + 1):  # the first round warms the page cache and is not counted
        loads.append(load_average())
        for name, cmd in commands.items():
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            times[name].append(time.perf_counter() - start)
            outputs[name] = done.stdout.strip()
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    res = {
        "benchmark": "startup",
        "machine": {**machine_info(), "load_average_per_round": loads},
        "commands": {
            k: " ".join(v[:4]) if k == "maskscope" else "python -c PLAIN DIR" for k, v in commands.items()
        },
        "runs_s": {k: [round(x, 3) for x in v[1:]] for k, v in times.items()},
        "median_s": medians,
        "ratio_plain_over_maskscope": medians["plain_transformers"] / medians["maskscope"],
        "goal": "maskscope no slower than the plain script (ratio >= 1)",
        "outputs": outputs,
    }
    write_json(args.out, res)
    for k, v in medians.items():
        print(f"{k:<20} {v:6.2f} s")
    print(f"plain / maskscope = {res['ratio_plain_over_maskscope']:.2f}; outputs: {outputs}")


if __name__ == "__main__":
    main()
