"""From a YAML spec to runs/<name>/{summary.json, *.png, report.html}, through the store."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from maskscope.errors import UserError
from maskscope.experiments import EXPERIMENTS, Experiment
from maskscope.files import read_yaml, validate
from maskscope.progress import Progress, Silent


def parse_spec(data: Any, source: str = "spec") -> tuple[Experiment, BaseModel]:
    """Validate a spec mapping into its experiment's pydantic Spec; one-line UserError on any problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a spec must be a mapping with an 'experiment' field")
    kind = data.get("experiment")
    if kind not in EXPERIMENTS:
        known = ", ".join(sorted(EXPERIMENTS))
        raise UserError(f"{source}: field 'experiment' must be one of {known}, not {kind!r}")
    experiment = EXPERIMENTS[kind]
    return experiment, validate(experiment.spec, data, source)


def load_spec(path: str | Path) -> tuple[Experiment, BaseModel]:
    """Read and validate a YAML spec file."""
    return parse_spec(read_yaml(path, "spec file"), str(path))


def run_spec(
    spec_path: str | Path,
    *,
    out_root: str | Path = "runs",
    store_path: str | Path | None = None,
    model: Any = None,
    progress: Progress | None = None,
) -> Path:
    """Run a spec file and write its outputs; returns the output directory. Rerunning resumes from the store."""
    experiment, spec = load_spec(spec_path)
    return run(experiment, spec, out_root=out_root, store_path=store_path, model=model, progress=progress)


def run(
    experiment: Experiment,
    spec: Any,
    *,
    out_root: str | Path = "runs",
    store_path: str | Path | None = None,
    model: Any = None,
    progress: Progress | None = None,
) -> Path:
    """Run a validated spec: resolve the model, go through the store, write summary, plots and report."""
    from maskscope.models.base import Capability, require
    from maskscope.models.registry import load_model
    from maskscope.report import render_report
    from maskscope.store import CachedModel, Store

    progress = progress or Silent()
    out_dir = Path(out_root) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(store_path or Path(out_root) / "maskscope.sqlite")
    started = time.time()
    try:
        if model is None:
            model = load_model(
                spec.model,
                precision=getattr(spec, "precision", "fp32"),
                progress=progress.note,
                server=getattr(spec, "server", None),
            )
        cached = CachedModel(model, store)
        extra = {
            role: CachedModel(
                load_model(name, precision=getattr(spec, "precision", "fp32"), progress=progress.note), store
            )
            for role, name in spec.extra_models().items()
        }
        with ExitStack() as steered:  # every call of the run, and so every key, is steered (not extra models)
            steering = getattr(spec, "steer", None)
            if steering is not None:
                require(cached, Capability.STEERING, "a steer block")
                steered.enter_context(cached.steer(**steering.arguments()))
            store.start_run(spec.name, spec.model_dump())
            try:
                if extra:
                    summary = experiment.run(cached, spec, progress, models=extra)
                else:
                    summary = experiment.run(cached, spec, progress)
            except BaseException:
                store.finish_run(spec.name, "interrupted")
                raise
        store.finish_run(spec.name, "done")
        summary["run"] = {**(store.run_record(spec.name) or {}), "seconds": round(time.time() - started, 2)}
        summary["run"].pop("spec", None)
        if hasattr(model, "request_stats"):
            summary["run"]["server"] = model.request_stats()
        (out_dir / "summary.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        experiment.plots(summary, out_dir)
        render_report(summary, out_dir)
    finally:
        store.close()
    return out_dir
