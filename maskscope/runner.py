"""From a YAML spec to runs/<name>/{summary.json, *.png, report.html}, through the store.

Before any model loads, the run's name must be a safe label, its directory must lie inside the output root,
and the output directory and the store must be writable (and the store readable and sound): a problem there
is one line, and nothing is left behind. Every output is written atomically (a temporary file renamed over
the target), so a kill mid-write never leaves half a file."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from maskscope.errors import UserError
from maskscope.experiments import EXPERIMENTS, Experiment
from maskscope.experiments.spec import check_run_name
from maskscope.files import atomic_write_text, read_yaml, validate, write_error, writing
from maskscope.progress import Progress, Silent


def parse_spec(data: Any, source: str = "spec") -> tuple[Experiment, BaseModel]:
    """Validate a spec mapping into its experiment's pydantic Spec; one-line UserError on any problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a spec must be a mapping with an 'experiment' field")
    kind = data.get("experiment")
    if not isinstance(kind, str) or kind not in EXPERIMENTS:
        known = ", ".join(sorted(EXPERIMENTS))
        raise UserError(f"{source}: field 'experiment' must be one of {known}, not {kind!r}")
    experiment = EXPERIMENTS[kind]
    spec = validate(experiment.spec, data, source)
    try:
        check_run_name(getattr(spec, "name", None))
    except ValueError as e:
        raise UserError(f"{source}: field 'name': {e}") from None
    return experiment, spec


def load_spec(
    path: str | Path, sets: list[str] | None = None, limit: int | None = None
) -> tuple[Experiment, BaseModel]:
    """Read and validate a YAML spec file, with `sets` (`path.to.field=value`, as `--set`) applied first and
    the run cut to the first `limit` items (the spec's `limited`). Relative paths in the file are resolved
    against the file's directory; those given by `sets` stay relative to the current directory."""
    from maskscope.experiments.spec import resolve_paths
    from maskscope.overrides import apply_sets, parse_set

    data = read_yaml(path, "spec file")
    changes = [parse_set(text) for text in sets or []]
    if changes:
        kind = data.get("experiment") if isinstance(data, dict) else None
        known = EXPERIMENTS.get(kind) if isinstance(kind, str) else None
        data = apply_sets(data, changes, known.spec if known is not None else None)
    experiment, spec = parse_spec(data, f"{path} (as changed on the command line)" if changes else str(path))
    resolve_paths(spec, Path(path).parent, keep=frozenset(location for location, _ in changes))
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, not {limit}")
        spec = spec.limited(limit)  # type: ignore[attr-defined]
    return experiment, spec


def run_spec(
    spec_path: str | Path,
    *,
    out_root: str | Path = "runs",
    store_path: str | Path | None = None,
    model: Any = None,
    progress: Progress | None = None,
    credentials: Any = None,
) -> Path:
    """Run a spec file and write its outputs; returns the output directory. Rerunning resumes from the store."""
    experiment, spec = load_spec(spec_path)
    return run(
        experiment,
        spec,
        out_root=out_root,
        store_path=store_path,
        model=model,
        progress=progress,
        credentials=credentials,
    )


def run_dir(out_root: str | Path, name: str) -> Path:
    """The directory of a run: out_root/name, refused unless name is a safe label and it stays in out_root."""
    try:
        check_run_name(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    root = Path(out_root)
    out_dir = root / name
    if out_dir.resolve().parent != root.resolve():
        raise UserError(f"the run directory {out_dir} would lie outside the output directory {root}")
    return out_dir


def redact(value: Any) -> Any:
    """A summary or spec with credentials removed from every string that is a URL or a model name."""
    from maskscope.models.openai_backend import redact_model_name

    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and value.startswith(("openai:", "http://", "https://")):
        return redact_model_name(value)
    return value


def finite(value: Any) -> Any:
    """A summary with every infinite or NaN float replaced by None, so that it is valid JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Created:
    """Directories and a store file made by this run, removed again if it fails before computing anything."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.store: Path | None = None

    def mkdir(self, path: Path) -> None:
        missing = []
        for p in [path, *path.parents]:
            if p.exists():
                break
            missing.append(p)
        with writing("the output directory", path):
            path.mkdir(parents=True, exist_ok=True)
        self.dirs += missing  # deepest first

    def remove(self) -> None:
        if self.store is not None:
            for p in (self.store, Path(f"{self.store}-wal"), Path(f"{self.store}-shm")):
                p.unlink(missing_ok=True)
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                break


def read_spec_files(spec: Any) -> None:
    """Read the files a spec names (a mask library, task files) before anything heavy loads, so that a
    missing or unreadable one is refused first; the experiment reads them again (they are small)."""
    from maskscope.tasks import TaskSpec, load_tasks

    if callable(getattr(spec, "mask_library", None)):
        spec.mask_library()
    steer = getattr(spec, "steer", None)
    if steer is not None and not Path(steer.vector).is_file():
        raise UserError(f"steering vector file not found: {steer.vector}")
    tasks = getattr(spec, "tasks", None)
    if isinstance(tasks, list) and tasks and all(isinstance(t, TaskSpec) for t in tasks):
        load_tasks(tasks)


def _placement(spec: Any, model_name: str) -> dict[str, Any]:
    """The spec's device, dtype and batch budget, for a local model (a server places its own)."""
    placement = spec.placement() if callable(getattr(spec, "placement", None)) else {}
    return {} if model_name.startswith("openai:") else placement


def _check_writable(directory: Path) -> None:
    """Refuse (one line) an output directory where a file cannot be created."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise (write_error(e, "outputs", directory) or e) from None


def run(
    experiment: Experiment,
    spec: Any,
    *,
    out_root: str | Path = "runs",
    store_path: str | Path | None = None,
    model: Any = None,
    progress: Progress | None = None,
    credentials: Any = None,
) -> Path:
    """Run a validated spec: check the output directory and the store, resolve the model, go through the
    store (steered for the whole run if the spec has a steer block), write summary, plots and report.
    `credentials` (the user's, never the spec's) reaches an openai:URL#MODEL backend."""
    from maskscope import runs
    from maskscope.models.base import Capability, require
    from maskscope.models.registry import check_model_name, load_model
    from maskscope.report import render_report
    from maskscope.store import CachedModel, Store

    progress = progress or Silent()
    run_dir(out_root, spec.name)  # the name is a safe label
    out_root = Path(out_root)
    store_file = Path(store_path) if store_path is not None else Path(out_root) / "maskscope.sqlite"
    if model is None:
        check_model_name(spec.model)
    if getattr(spec, "device", None) is not None:  # a device this machine lacks, before any directory is made
        from maskscope.models.loading import resolve_device

        resolve_device(spec.device)
    extra_names = spec.extra_models() if callable(getattr(spec, "extra_models", None)) else {}
    for name in extra_names.values():
        check_model_name(name)
    read_spec_files(spec)
    if store_file.is_dir():
        raise UserError(f"cannot use the store {store_file}: it is a directory; give a file path (--store)")

    created = _Created()
    store = None
    try:
        created.mkdir(out_root)
        _check_writable(out_root)
        created.mkdir(store_file.parent)
        if not store_file.exists():
            created.store = store_file
        store = Store(store_file, check=True)
        if model is None:
            model = load_model(
                spec.model,
                precision=getattr(spec, "precision", "fp32"),
                progress=progress.note,
                server=getattr(spec, "server", None),
                credentials=credentials,
                **_placement(spec, spec.model),
            )
        extra_loaded = {
            role: load_model(
                name,
                precision=getattr(spec, "precision", "fp32"),
                progress=progress.note,
                credentials=credentials,
                **_placement(spec, name),
            )
            for role, name in extra_names.items()
        }
        # the run's id: its name and a hash of what its numbers depend on (see maskscope/runs.py)
        spec_dump = redact(spec.model_dump())
        fingerprint = redact(model.fingerprint() if hasattr(model, "fingerprint") else {"name": model.name})
        digest = runs.run_digest(spec_dump, fingerprint, runs.resolved_inputs(spec))
        out_dir = runs.run_directory(out_root, runs.run_id(spec.name, digest))
        runs.check_unchanged(out_dir, digest)
        created.mkdir(out_dir)
    except BaseException:
        if store is not None:
            store.close()
        created.remove()
        raise

    started = time.time()
    try:
        from maskscope.metadata import collect, rendered_prompts

        cached = CachedModel(model, store)
        extra = {role: CachedModel(m, store) for role, m in extra_loaded.items()}
        metadata = collect(model, spec)  # before the run: the code and libraries that compute it
        info = runs.begin(
            out_dir,
            {
                "id": out_dir.name,
                "name": spec.name,
                "digest": digest,
                "spec": finite(spec_dump),
                "model": {"name": redact(model.name), "fingerprint": fingerprint},
                "versions": {"maskscope": metadata["maskscope"], "libraries": metadata["libraries"]},
            },
        )
        with ExitStack() as steered:  # every call of the run, and so every key, is steered (not extra models)
            steering = getattr(spec, "steer", None)
            if steering is not None:
                require(cached, Capability.STEERING, "a steer block")
                steered.enter_context(cached.steer(**steering.arguments()))
            store.start_run(spec.name, redact(spec.model_dump()))
            try:
                if extra:
                    summary = experiment.run(cached, spec, progress, models=extra)
                else:
                    summary = experiment.run(cached, spec, progress)
            except BaseException:
                store.finish_run(spec.name, "interrupted")
                runs.finish_quietly(out_dir, info, "interrupted")
                raise
        store.finish_run(spec.name, "done")
        summary["metadata"] = {**metadata, "rendered_prompts": rendered_prompts(store, spec.name)}
        summary = redact(summary)
        summary["run"] = {**(store.run_record(spec.name) or {}), "seconds": round(time.time() - started, 2)}
        summary["run"].pop("spec", None)
        summary["run"]["damaged_results_recomputed"] = store.damaged
        if store.damaged:
            progress.note(f"{store.damaged} damaged results recomputed")
        if hasattr(model, "request_stats"):
            summary["run"]["server"] = model.request_stats()
        try:
            write_outputs(experiment, summary, out_dir, render_report)
            token_texts = getattr(model, "token_texts", None)
            rows = runs.tables(summary, runs.store_calls(store, spec.name), token_texts)
            runs.write_tables(out_dir, rows)
        except BaseException:
            runs.finish_quietly(out_dir, info, "interrupted")
            raise
        runs.finish(out_dir, info, "done", counts={k: len(v) for k, v in rows.items()})
        runs.link_label(out_root, spec.name, out_dir.name)
    finally:
        if store is not None:
            store.close()
    return out_dir


def write_outputs(experiment: Experiment, summary: dict[str, Any], out_dir: Path, render: Any) -> None:
    """summary.json, the experiment's plots and exports, and report.html, each written atomically: the plots
    are drawn into a staging directory inside out_dir and renamed into place one by one."""
    text = json.dumps(finite(summary), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(out_dir / "summary.json", text, "summary.json")
    with writing("plots", out_dir):
        stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
        try:
            experiment.plots(summary, stage)
            for item in sorted(stage.iterdir()):
                if item.is_file():
                    os.replace(item, out_dir / item.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    render(summary, out_dir)
