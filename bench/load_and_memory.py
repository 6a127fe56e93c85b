"""Load-time and memory benchmark: cold and warm loads of the bundled model, and the demo's peak memory.

- Cold load: a fresh subprocess with an empty MASKSCOPE_CACHE directory, so that `load_model()` hashes and
  dequantizes the bundled GGUF file and writes the safetensors cache.
- Warm load: fresh subprocesses on that same cache (the usual case after the first run).
  Each load is split into the import of torch + transformers, the import of maskscope, and
  `maskscope.load_model()` itself; the subprocess's peak RSS is recorded too.
- Demo: `maskscope run examples/shutdown.yaml --out <tmp>` (what `make demo` runs), in a fresh output
  directory and store, with the user's model cache; its peak RSS (from wait4's rusage) and wall time.

"Cold" is maskscope's cache being empty; the operating system's page cache is not dropped, so the GGUF
file and the libraries may already be in memory. Writes bench/results/load_and_memory.json.

Run: python bench/load_and_memory.py   (add --skip-demo to leave out the demo run of several minutes)
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

from score_prefix import RESULTS, ROOT, SPEC, load_average, machine_info, write_json

CHILD = """
import json, resource, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
import maskscope
t2 = time.perf_counter()
model = maskscope.load_model()
t3 = time.perf_counter()
print(json.dumps({
    "import_torch_transformers_s": t1 - t0,
    "import_maskscope_s": t2 - t1,
    "load_model_s": t3 - t2,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def run_with_rusage(cmd: list[str], env: dict[str, str], log: Path | None = None) -> dict[str, Any]:
    """Run a command to completion; return its stdout, exit status, wall time and peak RSS (MiB)."""
    start = time.perf_counter()
    stderr = log.open("w") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log is not None:
            stderr.close()
    return {
        "stdout": out,
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def load_once(cache: Path) -> dict[str, Any]:
    """One model load in a fresh interpreter with the given cache directory."""
    env = {**os.environ, "MASKSCOPE_CACHE": str(cache)}
    res = run_with_rusage([sys.executable, "-c", CHILD], env)
    if res["returncode"] != 0:
        raise RuntimeError(f"load subprocess failed with status {res['returncode']}")
    parts = json.loads(res["stdout"].strip().splitlines()[-1])
    return {**parts, "process_wall_s": res["wall_s"], "process_peak_rss_mib": res["peak_rss_mib"]}


def loads(warm_repeats: int) -> dict[str, Any]:
    """A cold load in an empty cache, then `warm_repeats` warm loads from it."""
    with tempfile.TemporaryDirectory(prefix="maskscope-cache-") as tmp:
        cache = Path(tmp)
        print("  cold load", flush=True)
        cold = load_once(cache)
        warm = []
        for i in range(warm_repeats):
            print(f"  warm load {i + 1}", flush=True)
            warm.append(load_once(cache))
    keys = ("import_torch_transformers_s", "import_maskscope_s", "load_model_s", "process_wall_s")
    median = {k: statistics.median(w[k] for w in warm) for k in keys}
    return {
        "cold": cold,
        "warm_runs": warm,
        "warm_median": median,
        "goal_warm_load_model_s": 3.0,
        "goal_warm_met": median["load_model_s"] < 3.0,
    }


def demo() -> dict[str, Any]:
    """The demo experiment in a fresh output directory; its wall time and peak RSS."""
    script = Path(sys.executable).parent / "maskscope"
    with tempfile.TemporaryDirectory(prefix="maskscope-demo-") as tmp:
        cmd = [str(script), "run", str(SPEC.relative_to(ROOT)), "--out", tmp]
        print(f"  {' '.join(cmd)}", flush=True)
        before = load_average()
        res = run_with_rusage(cmd, dict(os.environ), log=Path(tmp) / "stderr.log")
        if res["returncode"] != 0:
            raise RuntimeError(f"demo failed with status {res['returncode']}: {res['stdout'][-2000:]}")
        wrote = sorted(p.name for p in (Path(tmp) / "shutdown").iterdir())
    return {
        "command": "maskscope run examples/shutdown.yaml --out <fresh temporary directory>",
        "model_cache": "the user's cache (model already dequantized)",
        "wall_s": res["wall_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "goal_peak_rss_mib": 2048,
        "goal_met": res["peak_rss_mib"] < 2048,
        "outputs": wrote,
        "load_average": [before, load_average()],
    }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-repeats", type=int, default=3, help="warm loads after the cold one")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the demo run")
    parser.add_argument("--out", type=Path, default=RESULTS / "load_and_memory.json")
    args = parser.parse_args()
    res: dict[str, Any] = {"benchmark": "load_and_memory", "machine": machine_info()}
    res["load"] = loads(args.warm_repeats)
    if not args.skip_demo:
        res["demo"] = demo()
    write_json(args.out, res)
    print_table(res)
    print(f"\nwrote {args.out}")


def print_table(res: dict[str, Any]) -> None:
    """A readable summary of a results dict."""
    cold, warm = res["load"]["cold"], res["load"]["warm_median"]
    print(
        f"\n{'load':<8}{'import torch+transformers':>27}{'import maskscope':>18}{'load_model()':>14}{'process':>10}"
    )
    for name, r in (("cold", cold), ("warm", warm)):
        print(
            f"{name:<8}{r['import_torch_transformers_s']:>26.2f}s{r['import_maskscope_s']:>17.2f}s"
            f"{r['load_model_s']:>13.2f}s{r['process_wall_s']:>9.2f}s"
        )
    print(f"peak RSS of the cold-load process: {cold['process_peak_rss_mib']:.0f} MiB")
    if "demo" in res:
        d = res["demo"]
        print(f"demo: peak RSS {d['peak_rss_mib']:.0f} MiB (goal < 2048), wall {d['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
