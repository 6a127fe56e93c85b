"""Run metadata: every summary records the chat template, the rendered prompts, the code and library
versions and the precision, and marks bf16 numbers as approximate."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as importlib_metadata

import numpy as np

import maskscope as ms
from maskscope.experiments import EXPERIMENTS
from maskscope.masks import Mask, Turn
from maskscope.metadata import collect, exactness, git_commit
from maskscope.runner import parse_spec, run

SPEC = {
    "experiment": "posterior",
    "name": "meta",
    "masks": [{"name": "a", "system": "You are A."}, {"name": "b", "system": "You are B."}],
    "transcript": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
}


def test_summary_records_template_prompts_versions_and_precision(tiny, tmp_path):
    _, spec = parse_spec(SPEC)
    out = run(EXPERIMENTS["posterior"], spec, out_root=tmp_path, model=tiny)
    md = json.loads((out / "summary.json").read_text())["metadata"]
    template = tiny.tokenizer.chat_template
    assert md["chat_template"]["sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert (
        "SYSTEM" in md["chat_template"]["probe_rendered"] and "USER" in md["chat_template"]["probe_rendered"]
    )
    # the rendered prompts are the two masks' contexts of the one assistant turn
    contexts = [
        Mask(name=m["name"], system=m["system"]).conversation([Turn(role="user", content="Hi")])
        for m in SPEC["masks"]
    ]
    prompts = sorted({tiny.render(c) for c in contexts})
    assert md["rendered_prompts"]["count"] == 2
    assert md["rendered_prompts"]["sha256"] == hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
    for lib in ("torch", "transformers", "numpy"):
        assert md["libraries"][lib] == importlib_metadata.version(lib)
    assert md["libraries"]["numpy"] == np.__version__
    assert md["maskscope"]["version"] == ms.__version__
    assert md["precision"] == "fp32" and md["numbers"].startswith("exact") and md["approximate"] is False
    commit = git_commit()
    assert md["maskscope"]["git"] == commit
    if commit is not None:
        assert len(commit["commit"]) == 40
    html = (out / "report.html").read_text()
    assert md["chat_template"]["sha256"][:16] in html and "approximate" not in html


def test_bf16_numbers_are_marked_approximate(tiny_dir, tmp_path):
    model = ms.load_model(f"hf:{tiny_dir}", precision="bf16")
    _, spec = parse_spec({**SPEC, "precision": "bf16"})
    out = run(EXPERIMENTS["posterior"], spec, out_root=tmp_path, model=model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metadata"]["precision"] == "bf16" and summary["metadata"]["approximate"] is True
    assert summary["metadata"]["numbers"].startswith("approximate")
    assert "approximate" in (out / "report.html").read_text()
    assert exactness("fp32").startswith("exact")
    served = collect(
        type(
            "Served",
            (),
            {
                "fingerprint": lambda self: {"backend": "openai"},
                "tokenizer": None,
                "render": lambda self, c: "x",
            },
        )(),
        spec,
    )
    assert served["approximate"] and "server" in served["numbers"]
