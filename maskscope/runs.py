"""Runs kept and compared: each run has an immutable id and its own directory under the output root.

The id is the spec's name (a label) followed by a short hash of what the results depend on: the fully resolved
spec (with the contents of the mask library it names) and the model's fingerprint (weights, precision, chat
template). The same command therefore maps to the same directory and resumes there from the store; any changed
parameter maps to a new directory and the old one is kept. `runs/<name>` is a link to the latest run of that
name, so `runs/<name>/report.html` still opens the newest report.

Beside summary.json, report.html and the plots, a run directory holds run.json (id, name, times, status, the
spec, versions, git commit, machine) and tables in JSONL and Parquet: `cells` (the summary's cells, flattened),
`samples` (every sampled reply, labelled with its cell where the summary says which prompt a cell used),
`calls` (every model call of the run: its key, method, prompt, arguments and full result, so every exact number)
and `tokens` (one row per token of every sample and every scored continuation)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from maskscope.errors import UserError
from maskscope.files import atomic_write, atomic_write_text

TABLES = ("cells", "samples", "calls", "tokens")
ID_PATTERN = re.compile(r"^(?P<name>.+)-(?P<digest>[0-9a-f]{10})$")


# ---------------------------------------------------------------------------------------------- identity
def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def resolved_inputs(spec: Any) -> dict[str, Any]:
    """The contents of the files a spec names (its mask library, its task sets), which its numbers depend on
    as much as on the spec's own fields."""
    from maskscope.tasks import TaskSpec, load_tasks

    out: dict[str, Any] = {}
    if callable(getattr(spec, "mask_library", None)):
        out["library"] = spec.mask_library()
    tasks = getattr(spec, "tasks", None)
    if isinstance(tasks, list) and tasks and all(isinstance(t, TaskSpec) for t in tasks):
        out["tasks"] = load_tasks(tasks)
    return json.loads(json.dumps(out, default=_jsonable, sort_keys=True))


def run_digest(
    spec_dump: Mapping[str, Any], fingerprint: Mapping[str, Any], inputs: Mapping[str, Any]
) -> str:
    """The SHA-256 (hex) of a run's resolved spec, model fingerprint and input files' contents."""
    text = json.dumps(
        {"spec": spec_dump, "model": fingerprint, "inputs": inputs},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_id(name: str, digest: str) -> str:
    """A run's id: its name and the first 10 hex digits of its digest."""
    return f"{name}-{digest[:10]}"


def run_directory(root: str | Path, rid: str) -> Path:
    """The directory of a run id under the output root, refused (one line) unless it lies inside the root
    (a link of that name pointing elsewhere); the id's name part is a label checked with the spec."""
    root = Path(root)
    out = root / rid
    if "/" in rid or rid in ("", ".", "..") or out.resolve().parent != root.resolve():
        raise UserError(f"the run directory {out} would lie outside the output directory {root}")
    return out


def machine() -> dict[str, Any]:
    """The machine a run ran on: host name, operating system, architecture, CPU count, Python."""
    return {
        "host": platform.node(),
        "system": platform.platform(),
        "architecture": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_info(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's run.json, or None when it has none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_unchanged(run_dir: Path, digest: str) -> None:
    """Refuse to reuse a run directory whose run.json records other parameters (never overwritten silently)."""
    info = read_info(run_dir)
    if info is not None and info.get("digest") != digest:
        raise UserError(
            f"the run directory {run_dir} holds a run of other parameters (digest {info.get('digest')!r}); "
            "it is kept as it is: move it away or give the spec another name"
        )


def write_info(run_dir: Path, info: Mapping[str, Any]) -> None:
    """Write run.json atomically."""
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=2, ensure_ascii=False), "run.json")


def begin(run_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Record in run.json that a run started or resumed: `created` is kept from an earlier attempt."""
    earlier = read_info(run_dir) or {}
    info = {
        **fields,
        "created": earlier.get("created") or _now(),
        "attempts": int(earlier.get("attempts") or 0) + 1,
        "status": "running",
        "finished": None,
        "machine": machine(),
    }
    write_info(run_dir, info)
    return info


def finish(run_dir: Path, info: dict[str, Any], status: str, **extra: Any) -> None:
    """Record in run.json how a run ended."""
    info.update(extra, status=status, finished=_now() if status == "done" else None)
    if status != "done":
        info["stopped"] = _now()
    write_info(run_dir, info)


def finish_quietly(run_dir: Path, info: dict[str, Any], status: str) -> None:
    """`finish`, for a run that is failing: a run.json that cannot be written (a full disk) must not hide the
    error that stopped the run."""
    try:
        finish(run_dir, info, status)
    except (OSError, UserError):
        pass


def link_label(root: Path, name: str, rid: str) -> None:
    """Point root/<name> at the run root/<rid> (a relative symbolic link), unless root/<name> is a real
    directory (a run written before runs had ids), which is left alone."""
    link = Path(root) / name
    if link.exists() and not link.is_symlink():
        return
    tmp = Path(root) / f".{name}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(rid, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without links: the label is a convenience, the run is complete
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- exports
def store_calls(store: Any, run: str) -> list[dict[str, Any]]:
    """Every model call a run made (from the store's record of its lookups): key, method, whether the store
    served it, and the stored parts and result. A call looked up but never computed has no result."""
    rows = []
    for key, method, hit in store.lookups(run):
        parts = store.parts(key) or {}
        rows.append(
            {
                "key": key,
                "method": method,
                "served_from_store": hit,
                "prompt": parts.get("prompt"),
                "args": parts.get("args"),
                "result": store.result(key),
            }
        )
    return rows


def _cell_labels(cell: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's own labels: its top-level scalar fields except the prompt."""
    return {
        k: v
        for k, v in cell.items()
        if k != "prompt" and (isinstance(v, str | int | float | bool) or v is None)
    }


def _summary_cells(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary's cells: its `cells` list, or for an experiment without one, its longest top-level list
    of mappings (e.g. the tasks of `capabilities`)."""
    lists = [v for v in summary.values() if isinstance(v, list) and v and all(isinstance(c, dict) for c in v)]
    cells = summary.get("cells")
    if isinstance(cells, list) and all(isinstance(c, dict) for c in cells):
        return cells
    return max(lists, key=len) if lists else []


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted column names; lists kept as JSON text (one cell, one row)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        elif isinstance(v, list | tuple):
            out[name] = json.dumps(v, ensure_ascii=False, default=str)
        else:
            out[name] = v
    return out


def _labeller(summary: Mapping[str, Any]) -> Callable[[dict[str, Any]], str | None] | None:
    """The experiment's own category of a sampled reply, where it has one (character: target, in
    character, other)."""
    if summary.get("experiment") != "character":
        return None
    from maskscope.experiments.character import classify
    from maskscope.models.base import Sample

    spec = summary.get("spec") or {}
    targets = spec.get("targets") or []
    markers = [re.compile(p, re.IGNORECASE) for p in spec.get("in_character") or []]
    return lambda s: classify(Sample.from_json(s), targets, markers)


def tables(
    summary: Mapping[str, Any],
    calls: Iterable[Mapping[str, Any]],
    token_texts: Callable[[list[int]], list[str]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The rows of a run's tables (cells, samples, calls, tokens) from its summary and its calls."""
    cells = _summary_cells(summary)
    by_prompt: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, cell in enumerate(cells):
        if isinstance(cell.get("prompt"), str):
            by_prompt.setdefault(cell["prompt"], (i, _cell_labels(cell)))
    label = _labeller(summary)
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    out["cells"] = [{"cell": i, **_flatten(c)} for i, c in enumerate(cells)]
    for call in calls:
        result, args = call.get("result"), call.get("args") or {}
        out["calls"].append(
            {
                "key": call["key"],
                "method": call["method"],
                "served_from_store": bool(call.get("served_from_store")),
                "prompt": call.get("prompt"),
                "args": json.dumps(args, ensure_ascii=False, sort_keys=True),
                "result": None if result is None else json.dumps(result, ensure_ascii=False),
            }
        )
        if not isinstance(result, dict):
            continue
        cell, labels = by_prompt.get(call.get("prompt") or "", (None, {}))
        if call["method"] == "sample" and "text" in result:
            ids = list(result.get("token_ids") or [])
            out["samples"].append(
                {
                    "key": call["key"],
                    "cell": cell,
                    **labels,
                    "index": result.get("index"),
                    "category": label(result) if label else None,
                    "text": result["text"],
                    "finish_reason": result.get("finish_reason"),
                    "n_tokens": len(ids),
                    "seed": args.get("seed"),
                    "temperature": args.get("temperature"),
                    "top_p": args.get("top_p"),
                    "max_new_tokens": args.get("max_new_tokens"),
                    "prompt": call.get("prompt"),
                }
            )
            texts = token_texts(ids) if token_texts and ids else [None] * len(ids)
            for pos, (tid, text) in enumerate(zip(ids, texts, strict=True)):
                out["tokens"].append(
                    {"key": call["key"], "source": "sample", "cell": cell, "index": result.get("index"),
                     "position": pos, "token_id": tid, "token": text, "logprob": None}
                )  # fmt: skip
        elif call["method"] == "score" and "logprobs" in result:
            for pos, (tid, tok, lp) in enumerate(
                zip(result["token_ids"], result["tokens"], result["logprobs"], strict=True)
            ):
                out["tokens"].append(
                    {"key": call["key"], "source": "score", "cell": cell, "index": None,
                     "continuation": result.get("continuation"), "position": pos, "token_id": tid,
                     "token": tok, "logprob": lp}
                )  # fmt: skip
    return out


def _frame(rows: list[dict[str, Any]]) -> Any:
    """A DataFrame of rows whose object columns hold only text (anything else as JSON), so that Arrow can
    write it."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype == object:
            values = df[col].tolist()
            if any(v is not None and not isinstance(v, str) for v in values) and not all(
                v is None or isinstance(v, bool) for v in values
            ):
                df[col] = [
                    v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values
                ]
    return df


def write_tables(run_dir: Path, rows: Mapping[str, list[dict[str, Any]]]) -> list[Path]:
    """Each table as NAME.jsonl and NAME.parquet in the run directory (written atomically)."""
    written = []
    for name, table in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table)
        written.append(atomic_write_text(Path(run_dir) / f"{name}.jsonl", text, f"{name}.jsonl"))
        df = _frame(table)
        written.append(
            atomic_write(
                Path(run_dir) / f"{name}.parquet", lambda tmp, df=df: df.to_parquet(tmp, index=False)
            )
        )
    return written


# ---------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class Run:
    """A finished (or interrupted) run read back: run.json, the summary, and its tables as DataFrames
    (an empty DataFrame where a run has no such rows)."""

    path: Path
    info: dict[str, Any]
    summary: dict[str, Any]
    cells: Any
    samples: Any
    calls: Any
    tokens: Any

    @property
    def id(self) -> str:
        """The run's id."""
        return str(self.info.get("id") or self.path.name)


def _read_table(run_dir: Path, name: str) -> Any:
    import pandas as pd

    parquet, jsonl = run_dir / f"{name}.parquet", run_dir / f"{name}.jsonl"
    if parquet.exists():
        return pd.read_parquet(parquet)
    if jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line]
        return pd.DataFrame(rows)
    return pd.DataFrame()


def read_run(path: str | Path) -> Run:
    """A run directory (or its run.json) read into run.json, the summary and DataFrames of its cells,
    samples, calls and tokens."""
    run_dir = Path(path)
    if run_dir.name == "run.json":
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    info = read_info(run_dir)
    if info is None:
        raise UserError(f"{run_dir} is not a run directory (no readable run.json)")
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    frames = {name: _read_table(run_dir, name) for name in TABLES}
    return Run(run_dir, info, summary, **frames)


def run_dirs(root: str | Path) -> list[Path]:
    """The run directories under an output root (those with a run.json; labels that link to them skipped),
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / "run.json").is_file()]
    return sorted(found, key=lambda p: ((read_info(p) or {}).get("created") or "", p.name))


def read_runs(root: str | Path = "runs") -> Any:
    """One row per run under an output root (id, name, experiment, model, status, times, digest, path), as
    a DataFrame: the counterpart of inspect_ai's evals_df."""
    import pandas as pd

    rows = []
    for p in run_dirs(root):
        info = read_info(p) or {}
        spec = info.get("spec") or {}
        rows.append(
            {
                "id": info.get("id", p.name),
                "name": info.get("name"),
                "experiment": spec.get("experiment"),
                "model": (info.get("model") or {}).get("name") or spec.get("model"),
                "status": info.get("status"),
                "created": info.get("created"),
                "finished": info.get("finished"),
                "digest": info.get("digest"),
                "path": str(p),
            }
        )
    return pd.DataFrame(
        rows, columns=["id", "name", "experiment", "model", "status", "created", "finished", "digest", "path"]
    )


def read_samples(root: str | Path = "runs") -> Any:
    """Every sample of every run under an output root, one row each with its run's id and experiment: the
    counterpart of inspect_ai's samples_df."""
    import pandas as pd

    frames = []
    for p in run_dirs(root):
        info = read_info(p) or {}
        df = _read_table(p, "samples")
        if len(df):
            experiment = (info.get("spec") or {}).get("experiment")
            frames.append(df.assign(run_id=info.get("id", p.name), experiment=experiment))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def resolve(root: str | Path, ref: str) -> Path:
    """The run directory a reference names: an id, a name (its latest run), a unique prefix of an id, or a
    path to a run directory."""
    root = Path(root)
    direct = Path(ref)
    if (direct / "run.json").is_file():
        return direct
    if "/" not in ref and ref not in ("", ".", ".."):
        candidate = root / ref
        if (candidate / "run.json").is_file() and candidate.resolve().parent == root.resolve():
            return candidate.resolve() if candidate.is_symlink() else candidate
    matches = [p for p in run_dirs(root) if p.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no run {ref!r} under {root} (see `maskscope runs list --root {root}`)")
    raise UserError(f"{len(matches)} runs under {root} begin with {ref!r}: give more of the id")


# ---------------------------------------------------------------------------------------------- comparing
def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested value flattened to {dotted.path: leaf}; list items are indexed (a.0.b)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out or ({prefix[:-1]: {}} if prefix else {})
    if isinstance(value, list | tuple):
        out = {}
        for i, v in enumerate(value):
            out.update(flat(v, f"{prefix}{i}."))
        return out or ({prefix[:-1]: []} if prefix else {})
    return {prefix[:-1]: value}


def spec_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The spec fields (dotted paths) in which two runs differ, with each run's value (None: absent)."""
    fa, fb = flat(a), flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary's numbers by dotted path, cells named by their labels rather than their position."""
    out: dict[str, float] = {}
    for i, cell in enumerate(_summary_cells(summary)):
        labels = [str(v) for k, v in _cell_labels(cell).items() if isinstance(v, str)]
        name = "/".join(labels) or str(i)
        for k, v in flat({k: v for k, v in cell.items() if k != "prompt"}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"cells[{name}].{k}"] = v
    return out


def number_differences(
    a: Mapping[str, Any], b: Mapping[str, Any]
) -> list[tuple[str, float | None, float | None]]:
    """The cells' numbers of two summaries side by side (matched by cell labels), those that differ."""
    na, nb = _numbers(a), _numbers(b)
    keys = sorted(set(na) | set(nb))
    return [(k, na.get(k), nb.get(k)) for k in keys if na.get(k) != nb.get(k)]


def numbers_side_by_side(
    a: Mapping[str, Any], b: Mapping[str, Any]
) -> list[tuple[str, float | None, float | None]]:
    """Every number of the cells of two summaries side by side (matched by cell labels)."""
    na, nb = _numbers(a), _numbers(b)
    return [(k, na.get(k), nb.get(k)) for k in sorted(set(na) | set(nb))]
