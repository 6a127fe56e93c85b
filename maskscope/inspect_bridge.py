"""A run exported as an inspect_ai eval log, so that `inspect view` shows maskscope's samples and scores beside
a researcher's other evals. Written with inspect_ai's own types (an optional extra: `maskscope[inspect]`).

One inspect sample per sampled reply: its input is the prompt as the model saw it (rendered by the chat
template), its output the reply, its score the experiment's category of the reply where it has one, and its
metadata the cell's labels and the cell's exact numbers. The log's results give each category's share of all
the run's replies with its Wilson interval; per-cell rates and intervals stay in the maskscope report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from maskscope.errors import UserError

STOP_REASONS = {"length": "max_tokens", "stop": "stop", "eos": "stop", "end": "stop"}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def eval_log(run: Any) -> Any:
    """The inspect_ai EvalLog of a run read with maskscope.read_run."""
    try:
        from inspect_ai.log import (
            EvalConfig,
            EvalDataset,
            EvalLog,
            EvalMetric,
            EvalResults,
            EvalSample,
            EvalScore,
            EvalSpec,
            EvalStats,
        )
        from inspect_ai.model import ChatMessageAssistant, ChatMessageUser, ModelOutput
        from inspect_ai.scorer import Score
    except ImportError as e:
        raise UserError(
            f"exporting to inspect needs inspect_ai ({e.name or e} is missing): pip install 'maskscope[inspect]'"
        ) from None
    from maskscope.stats import share_ci

    info, spec = run.info, run.info.get("spec") or {}
    experiment = spec.get("experiment") or run.summary.get("experiment") or "run"
    model = f"maskscope/{(info.get('model') or {}).get('name') or spec.get('model')}"
    cells = {int(row["cell"]): row for row in run.cells.to_dict("records")} if len(run.cells) else {}
    targets = spec.get("targets") or []
    samples = []
    rows = run.samples.to_dict("records") if len(run.samples) else []
    for row in rows:
        row = {k: _plain(v) for k, v in row.items()}
        cell = cells.get(int(row["cell"])) if row.get("cell") is not None else None
        labels = {
            k: v for k, v in (cell or {}).items() if isinstance(v, str) and "." not in k and k != "prompt"
        }
        exact = {
            k: _plain(v) for k, v in (cell or {}).items() if k.startswith("exact.") and _plain(v) is not None
        }
        label = "/".join(labels.values()) or str(row.get("cell"))
        text = row["text"]
        scores = {"category": Score(value=row["category"], answer=text)} if row.get("category") else None
        samples.append(
            EvalSample(
                id=f"{label}#{row.get('index')}",
                epoch=1,
                input=[ChatMessageUser(content=row.get("prompt") or "")],
                target=targets,
                messages=[
                    ChatMessageUser(content=row.get("prompt") or ""),
                    ChatMessageAssistant(content=text),
                ],
                output=ModelOutput.from_content(
                    model, text, stop_reason=STOP_REASONS.get(row.get("finish_reason") or "", "unknown")
                ),
                scores=scores,
                metadata={
                    "cell": row.get("cell"),
                    **labels,
                    "index": row.get("index"),
                    "seed": row.get("seed"),
                    "temperature": row.get("temperature"),
                    "finish_reason": row.get("finish_reason"),
                    "store_key": row.get("key"),
                    "exact": exact,
                },
            )
        )
    categories = sorted({r["category"] for r in rows if r.get("category")})
    metrics = {}
    for cat in categories:
        share = share_ci([r["category"] == cat for r in rows], unit="replies")
        metrics[cat] = EvalMetric(
            name=cat, value=share["rate"], metadata={"ci95": share["ci95"], "k": share["k"]}
        )
    scores = [
        EvalScore(
            name="category",
            scorer=f"maskscope.{experiment}",
            scored_samples=len(rows),
            metrics=metrics,
            metadata={"meaning": "sampled share of all the run's replies in each category, Wilson 95% interval"},
        )
    ] if metrics else []  # fmt: skip
    created = info.get("created") or ""
    return EvalLog(
        status="success" if info.get("status") == "done" else "cancelled",
        eval=EvalSpec(
            eval_id=run.id,
            run_id=run.id,
            created=created,
            task=f"maskscope/{experiment}",
            task_id=run.id,
            dataset=EvalDataset(
                name=info.get("name"), samples=len(samples), sample_ids=[s.id for s in samples]
            ),
            model=model,
            config=EvalConfig(),
            metadata={
                "maskscope": {
                    "id": run.id,
                    "digest": info.get("digest"),
                    "spec": json.loads(json.dumps(spec, default=str)),
                    "versions": info.get("versions"),
                    "directory": str(run.path),
                }
            },
        ),
        results=EvalResults(total_samples=len(samples), completed_samples=len(samples), scores=scores),
        stats=EvalStats(started_at=created, completed_at=info.get("finished") or created),
        samples=samples,
    )


def write_inspect_log(run: Any, path: str | Path | None = None) -> Path:
    """Write a run's inspect_ai eval log (default: RUN_DIR/ID.eval) and return its path."""
    log = eval_log(run)  # first: a missing inspect_ai is one line
    from inspect_ai.log import write_eval_log

    target = Path(path) if path is not None else run.path / f"{run.id}.eval"
    if target.suffix not in (".eval", ".json"):
        raise UserError(f"an inspect log file ends in .eval or .json, not {target.name!r}")
    try:
        write_eval_log(log, str(target))
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    return target
