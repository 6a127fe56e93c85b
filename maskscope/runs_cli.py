"""`maskscope runs list|show|diff|export` and `maskscope view`: the kept runs under an output root."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from maskscope.errors import UserError

runs_app = typer.Typer(
    no_args_is_help=True, help="The runs kept under an output root: list, show, compare, export."
)
out = Console()

RootOpt = Annotated[Path, typer.Option("--root", help="The output root the runs are under.")]


def _text(value: Any, width: int = 60) -> Text:
    """A value as plain text for a table (never read as rich markup: run data is data)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return Text(text if len(text) <= width else text[: width - 1] + "…")


def _number(value: float | None) -> Text:
    if value is None:
        return Text("—")
    if isinstance(value, int):
        return Text(str(value))
    return Text(f"{value:.6g}")


@runs_app.command("list")
def runs_list(
    root: RootOpt = Path("runs"),
    contains: Annotated[
        str | None,
        typer.Option("--filter", help="Only runs whose id, experiment or model contain this text."),
    ] = None,
) -> None:
    """Every run under the output root, oldest first: id, experiment, model, status, when."""
    from maskscope.runs import read_runs

    df = read_runs(root)
    table = Table(title=f"runs under {root}")
    width = max([len(str(i)) for i in df["id"]] + [2])
    table.add_column("id", no_wrap=True, min_width=width)  # an id is never cut: it is what the user types
    for column in ("experiment", "model", "status", "created", "finished"):
        table.add_column(column)
    shown = 0
    for row in df.to_dict("records"):
        text = " ".join(str(row[k]) for k in ("id", "experiment", "model"))
        if contains and contains.lower() not in text.lower():
            continue
        shown += 1
        when = {k: (row[k] or "—")[:16].replace("T", " ") for k in ("created", "finished")}
        table.add_row(
            *(_text(row[k] or "—") for k in ("id", "experiment", "model", "status")),
            *map(Text, when.values()),
        )
    if not shown:
        out.print(f"no runs under {root}" + (f" matching {contains!r}" if contains else ""), markup=False)
        return
    out.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="A run id, a unique prefix of one, or a name (its latest run).")],
    root: RootOpt = Path("runs"),
) -> None:
    """A run's record: id, status, times, model, code version, machine, files and table sizes."""
    from maskscope.runs import TABLES, read_run, resolve

    r = read_run(resolve(root, run))
    info = r.info
    table = Table("field", "value", title=f"run {r.id}", show_header=False)
    git = ((info.get("versions") or {}).get("maskscope") or {}).get("git") or {}
    rows = {
        "name": info.get("name"),
        "status": info.get("status"),
        "created": info.get("created"),
        "finished": info.get("finished"),
        "attempts": info.get("attempts"),
        "experiment": (info.get("spec") or {}).get("experiment"),
        "model": (info.get("model") or {}).get("name"),
        "digest": info.get("digest"),
        "git commit": (git.get("commit") or "—") + (" (uncommitted changes)" if git.get("dirty") else ""),
        "machine": " ".join(str(v) for v in (info.get("machine") or {}).values()),
        "directory": str(r.path),
    }
    for name in TABLES:
        frame = getattr(r, name)
        rows[f"{name} rows"] = f"{len(frame)} ({name}.jsonl, {name}.parquet)"
    for k, v in rows.items():
        table.add_row(Text(k), _text(v if v is not None else "—", 100))
    out.print(table)


@runs_app.command("diff")
def runs_diff(
    a: Annotated[str, typer.Argument(help="The first run (id, prefix or name).")],
    b: Annotated[str, typer.Argument(help="The second run.")],
    root: RootOpt = Path("runs"),
    every: Annotated[bool, typer.Option("--all", help="Show equal numbers too.")] = False,
) -> None:
    """The spec fields in which two runs differ, then the cells' numbers side by side."""
    from maskscope.runs import numbers_side_by_side, read_run, resolve, spec_differences

    ra, rb = read_run(resolve(root, a)), read_run(resolve(root, b))
    fields = spec_differences(ra.info.get("spec") or {}, rb.info.get("spec") or {})
    if ra.info.get("model", {}).get("fingerprint") != rb.info.get("model", {}).get("fingerprint"):
        fields.append(("model fingerprint", "differs", "differs"))
    out.print(f"a: {ra.id}\nb: {rb.id}", markup=False, highlight=False)
    table = Table("spec field", "a", "b", title="spec fields that differ")
    for field, va, vb in fields:
        table.add_row(Text(field), _text(va if va is not None else "—"), _text(vb if vb is not None else "—"))
    out.print(table if fields else "the specs are the same", markup=False)
    numbers = numbers_side_by_side(ra.summary, rb.summary)
    differing = [(k, x, y) for k, x, y in numbers if x != y]
    shown = numbers if every else differing
    table = Table(
        "number", "a", "b", "b - a", title=f"numbers side by side ({len(differing)} of {len(numbers)} differ)"
    )
    for k, x, y in shown:
        delta = y - x if isinstance(x, int | float) and isinstance(y, int | float) else None
        table.add_row(Text(k), _number(x), _number(y), _number(delta))
    out.print(table)


@runs_app.command("export")
def runs_export(
    run: Annotated[str, typer.Argument(help="A run id, a unique prefix of one, or a name (its latest run).")],
    format: Annotated[str, typer.Option("--format", help="inspect: an inspect_ai eval log.")] = "inspect",  # noqa: A002
    output: Annotated[
        Path | None, typer.Option("--out", help="The file to write (default: in the run directory).")
    ] = None,
    root: RootOpt = Path("runs"),
) -> None:
    """Export a run for another tool: `--format inspect` writes an inspect_ai eval log (`inspect view` shows it)."""
    from maskscope.runs import read_run, resolve

    if format != "inspect":
        raise UserError(f"--format must be inspect, not {format!r}")
    from maskscope.inspect_bridge import write_inspect_log

    r = read_run(resolve(root, run))
    path = write_inspect_log(r, output)
    out.print(f"wrote {path}", markup=False, highlight=False)


def view_command(
    root: RootOpt = Path("runs"),
    port: Annotated[int, typer.Option("--port", help="The port on 127.0.0.1 (0: any free port).")] = 8765,
) -> None:
    """Serve a page over every run under the output root, on 127.0.0.1 only: list and filter runs, open a
    report, browse samples by cell and category, compare two runs side by side."""
    from maskscope.viewer import serve

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {port}")
    serve(root, port, announce=lambda url: out.print(f"serving {root} at {url} (Ctrl-C stops)", markup=False))
