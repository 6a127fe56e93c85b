"""`maskscope view`: a local page over every run under an output root, served on 127.0.0.1 only.

Pages: the runs (filtered by the query parameters q, experiment and status), one run (its record, its report,
its cells, its samples filtered by cell, category and text), and two runs side by side. Every page is rendered
on the server with Jinja's autoescaping, so text that came from a model is shown as text; the pages carry no
script at all, and a Content-Security-Policy that forbids scripts is the second line. Requests whose Host is
not the loopback address are refused (a web page elsewhere cannot reach the viewer through DNS rebinding)."""

from __future__ import annotations

import http.server
import mimetypes
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

from maskscope.errors import UserError

CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SAMPLE_LIMIT = 500
NUMBER_COLUMNS = 12

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}maskscope runs{% endblock %}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
td.text { white-space: pre-wrap; max-width: 60em; font-family: ui-monospace, monospace; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff4d6; }
form { margin: 0.5em 0 1em; }
nav a { margin-right: 1em; }
.side { display: flex; gap: 2em; } .side > div { flex: 1; }
</style></head>
<body><nav><a href="/">runs</a></nav>
{% block body %}{% endblock %}
</body></html>"""

INDEX = """{% extends "base" %}
{% block body %}
<h1>Runs under {{ root }}</h1>
<form method="get" action="/">
  <label>contains <input name="q" value="{{ q }}"></label>
  <label>experiment <select name="experiment"><option value="">any</option>
  {% for e in experiments %}<option{% if e == experiment %} selected{% endif %}>{{ e }}</option>{% endfor %}
  </select></label>
  <label>status <select name="status"><option value="">any</option>
  {% for s in statuses %}<option{% if s == status %} selected{% endif %}>{{ s }}</option>{% endfor %}
  </select></label>
  <button type="submit">filter</button>
</form>
<p id="count">{{ rows|length }} of {{ total }} runs</p>
<table id="runs"><tr><th>id</th><th>experiment</th><th>model</th><th>status</th><th>created</th></tr>
{% for r in rows %}<tr class="run"><td><a href="/run/{{ r.id|urlencode }}">{{ r.id }}</a></td>
<td>{{ r.experiment }}</td><td>{{ r.model }}</td><td>{{ r.status }}</td><td>{{ r.created }}</td></tr>
{% endfor %}</table>
<h2>Compare two runs</h2>
<form method="get" action="/compare">
  <select name="a">{% for r in all_ids %}<option>{{ r }}</option>{% endfor %}</select>
  <select name="b">{% for r in all_ids %}<option{% if loop.index == 2 %} selected{% endif %}>{{ r }}</option>
  {% endfor %}</select>
  <button type="submit">compare</button>
</form>
{% endblock %}"""

RUN = """{% extends "base" %}
{% block title %}run {{ id }}{% endblock %}
{% block body %}
<h1>Run {{ id }}</h1>
<table id="info">{% for k, v in info %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<p>{% if has_report %}<a id="report" href="/run/{{ id|urlencode }}/files/report.html">open the report</a> · {% endif %}
files: {% for f in files %}<a href="/run/{{ id|urlencode }}/files/{{ f|urlencode }}">{{ f }}</a> {% endfor %}</p>
<h2>Cells</h2>
<table id="cells"><tr>{% for c in cell_columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in cells %}<tr>{% for v in row %}<td{% if v is number %} class="num"{% endif %}>{{ v|fmt }}</td>
{% endfor %}</tr>{% endfor %}</table>
<h2 id="samples-heading">Samples</h2>
<form method="get" action="/run/{{ id|urlencode }}">
  <label>cell <select name="cell"><option value="">any</option>
  {% for value, label in cell_choices %}<option value="{{ value }}"{% if value == cell %} selected{% endif %}>
  {{ label }}</option>{% endfor %}</select></label>
  <label>category <select name="category"><option value="">any</option>
  {% for c in categories %}<option{% if c == category %} selected{% endif %}>{{ c }}</option>{% endfor %}
  </select></label>
  <label>text contains <input name="q" value="{{ q }}"></label>
  <button type="submit">filter</button>
</form>
<p id="sample-count">{{ shown }} of {{ matching }} matching samples ({{ total }} in the run){% if matching > shown %};
all of them are in samples.parquet{% endif %}</p>
<table id="samples"><tr>{% for c in sample_columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in samples %}<tr class="sample">
{% for c, v in row %}<td{% if c == "text" %} class="text"{% endif %}>{{ v|fmt }}</td>
{% endfor %}</tr>{% endfor %}</table>
{% endblock %}"""

COMPARE = """{% extends "base" %}
{% block title %}compare {{ a }} and {{ b }}{% endblock %}
{% block body %}
<h1>{{ a }} and {{ b }}</h1>
<h2>Spec fields that differ</h2>
{% if fields %}<table id="fields"><tr><th>field</th><th>{{ a }}</th><th>{{ b }}</th></tr>
{% for f, x, y in fields %}<tr><td>{{ f }}</td><td>{{ x|fmt }}</td><td>{{ y|fmt }}</td></tr>{% endfor %}</table>
{% else %}<p>The specs are the same.</p>{% endif %}
<h2>Numbers side by side ({{ differing }} of {{ numbers|length }} differ)</h2>
<table id="numbers"><tr><th>number</th><th>{{ a }}</th><th>{{ b }}</th><th>b − a</th></tr>
{% for k, x, y, d in numbers %}<tr{% if x != y %} class="differs"{% endif %}><td>{{ k }}</td>
<td class="num">{{ x|fmt }}</td><td class="num">{{ y|fmt }}</td><td class="num">{{ d|fmt }}</td></tr>{% endfor %}
</table>
<h2>Samples side by side</h2>
<div class="side">{% for rid, rows in samples %}<div><h3>{{ rid }}</h3>
<table class="samples"><tr><th>cell</th><th>index</th><th>category</th><th>text</th></tr>
{% for row in rows %}<tr class="sample"><td>{{ row.label }}</td><td>{{ row.index }}</td><td>{{ row.category|fmt }}</td>
<td class="text">{{ row.text }}</td></tr>{% endfor %}</table></div>{% endfor %}</div>
{% endblock %}"""

ERROR = """{% extends "base" %}{% block title %}not found{% endblock %}
{% block body %}<h1>Not found</h1><p>{{ message }}</p>{% endblock %}"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base": BASE, "index": INDEX, "run": RUN, "compare": COMPARE, "error": ERROR}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
ENV.filters["fmt"] = _fmt


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _clean(value: Any) -> Any:
    """A pandas value as a plain Python value (NaN as None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class Viewer:
    """The pages of the viewer over one output root (each page read from disk when asked for)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def runs(self) -> dict[str, Path]:
        """Run id -> directory, for every run under the root."""
        from maskscope.runs import run_dirs

        return {p.name: p for p in run_dirs(self.root)}

    def index(self, query: dict[str, str]) -> str:
        """The list of runs, filtered by q (text in id, experiment or model), experiment and status."""
        from maskscope.runs import read_runs

        df = read_runs(self.root)
        rows = [{k: _clean(v) for k, v in r.items()} for r in df.to_dict("records")]
        q, experiment, status = query.get("q", ""), query.get("experiment", ""), query.get("status", "")
        shown = [
            r
            for r in rows
            if (not q or q.lower() in " ".join(str(r[k]) for k in ("id", "experiment", "model")).lower())
            and (not experiment or r["experiment"] == experiment)
            and (not status or r["status"] == status)
        ]
        return ENV.get_template("index").render(
            root=str(self.root),
            rows=shown,
            total=len(rows),
            q=q,
            experiment=experiment,
            status=status,
            experiments=sorted({r["experiment"] for r in rows if r["experiment"]}),
            statuses=sorted({r["status"] for r in rows if r["status"]}),
            all_ids=[r["id"] for r in rows],
        )

    def run(self, rid: str, query: dict[str, str]) -> str | None:
        """One run: its record, its cells and its samples filtered by cell, category and text."""
        from maskscope.runs import read_run

        path = self.runs().get(rid)
        if path is None:
            return None
        r = read_run(path)
        info = r.info
        facts = [
            ("name", info.get("name")),
            ("experiment", (info.get("spec") or {}).get("experiment")),
            ("model", (info.get("model") or {}).get("name")),
            ("status", info.get("status")),
            ("created", info.get("created")),
            ("finished", info.get("finished")),
            ("digest", info.get("digest")),
        ]
        labels = _label_columns(r.cells)
        numbers = [
            c
            for c in r.cells.columns
            if c != "cell" and c not in labels and r.cells[c].map(_is_number).all() and len(r.cells)
        ][:NUMBER_COLUMNS]
        cell_columns = ["cell", *labels, *numbers]
        cells = (
            [[_clean(row[c]) for c in cell_columns] for _, row in r.cells.iterrows()] if len(r.cells) else []
        )
        cell_choices = [
            (str(int(row["cell"])), " / ".join(str(row[c]) for c in labels) or str(int(row["cell"])))
            for _, row in r.cells.iterrows()
        ]
        samples = r.samples
        total = len(samples)
        cell, category, q = query.get("cell", ""), query.get("category", ""), query.get("q", "")
        categories: list[str] = []
        if total:
            if "category" in samples:
                categories = sorted({str(c) for c in samples["category"].dropna()})
            if cell:
                import pandas as pd

                wanted = float(cell) if cell.isdigit() else float("nan")
                samples = samples[pd.to_numeric(samples["cell"], errors="coerce") == wanted]
            if category and "category" in samples:
                samples = samples[samples["category"] == category]
            if q:
                samples = samples[samples["text"].str.contains(q, case=False, regex=False)]
        hidden = {"key", "prompt", "seed", "temperature", "top_p", "max_new_tokens", "n_tokens"}
        sample_columns = [c for c in samples.columns if c not in hidden and c != "text"] + (
            ["text"] if "text" in samples else []
        )
        rows = [
            [(c, _clean(row[c])) for c in sample_columns] for _, row in samples.head(SAMPLE_LIMIT).iterrows()
        ]
        files = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return ENV.get_template("run").render(
            id=rid,
            info=facts,
            has_report=(path / "report.html").is_file(),
            files=files,
            cell_columns=cell_columns,
            cells=cells,
            cell_choices=cell_choices,
            cell=cell,
            categories=categories,
            category=category,
            q=q,
            sample_columns=sample_columns,
            samples=rows,
            shown=len(rows),
            matching=len(samples),
            total=total,
        )

    def compare(self, a: str, b: str) -> str | None:
        """Two runs side by side: the spec fields that differ, every number, a few samples of each cell."""
        from maskscope.runs import numbers_side_by_side, read_run, spec_differences

        runs = self.runs()
        if a not in runs or b not in runs:
            return None
        ra, rb = read_run(runs[a]), read_run(runs[b])
        fields = spec_differences(ra.info.get("spec") or {}, rb.info.get("spec") or {})
        numbers = [
            (k, x, y, y - x if _is_number(x) and _is_number(y) else None)
            for k, x, y in numbers_side_by_side(ra.summary, rb.summary)
        ]
        samples = []
        for r in (ra, rb):
            labels = _label_columns(r.samples, exclude={"category", "finish_reason", "text", "prompt", "key"})
            rows = []
            if len(r.samples):
                for _, s in r.samples.sort_values(["cell", "index"], na_position="last").groupby(
                    "cell", dropna=False, sort=False
                ):
                    for _, row in s.head(3).iterrows():
                        label = " / ".join(str(row[c]) for c in labels) or _fmt(_clean(row["cell"]))
                        rows.append(
                            {
                                "label": label,
                                "index": _clean(row.get("index")),
                                "category": _clean(row.get("category")),
                                "text": row["text"],
                            }
                        )
            samples.append((r.id, rows))
        return ENV.get_template("compare").render(
            a=a,
            b=b,
            fields=fields,
            numbers=numbers,
            differing=sum(x != y for _, x, y, _ in numbers),
            samples=samples,
        )

    def file(self, rid: str, name: str) -> Path | None:
        """A file directly inside a run directory (by its exact name; nothing else is served)."""
        path = self.runs().get(rid)
        if path is None:
            return None
        names = {p.name: p for p in path.iterdir() if p.is_file() and not p.is_symlink()}
        return names.get(name)


def _label_columns(df: Any, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The text columns that label a cell (persona, pressure, ...): strings, before the numbers."""
    skip = {"cell", "index", "key", "prompt", "text", "category", "finish_reason", *exclude}
    out = []
    for c in df.columns:
        if c in skip or "." in c:
            continue
        values = df[c].dropna()
        if len(values) and values.map(lambda v: isinstance(v, str)).all():
            out.append(c)
    return out


def make_handler(
    viewer: Viewer, allowed_hosts: Callable[[], set[str]]
) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler class of a viewer."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "maskscope-view"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _html(self, status: int, text: str) -> None:
            self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

        def _not_found(self, message: str) -> None:
            self._html(404, ENV.get_template("error").render(message=message))

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("Host", "") not in allowed_hosts():
                self._send(421, b"this viewer answers only on its loopback address", "text/plain")
                return
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
            try:
                if not parts:
                    self._html(200, viewer.index(query))
                elif parts[0] == "run" and len(parts) == 2:
                    page = viewer.run(parts[1], query)
                    self._html(200, page) if page else self._not_found(f"no run {parts[1]}")
                elif parts[0] == "run" and len(parts) == 4 and parts[2] == "files":
                    path = viewer.file(parts[1], parts[3])
                    if path is None:
                        self._not_found(f"no file {parts[3]} in run {parts[1]}")
                    else:
                        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                        if kind.startswith("text/") or kind == "application/json":
                            kind += "; charset=utf-8"
                        self._send(200, path.read_bytes(), kind)
                elif parts == ["compare"]:
                    page = viewer.compare(query.get("a", ""), query.get("b", ""))
                    self._html(200, page) if page else self._not_found("give two run ids: /compare?a=ID&b=ID")
                else:
                    self._not_found(f"no page {url.path}")
            except (UserError, OSError, ValueError) as e:
                self._not_found(str(e))

    return Handler


def make_server(root: str | Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A viewer server bound to 127.0.0.1 (port 0: any free port), not yet serving."""
    viewer = Viewer(root)
    holder: dict[str, set[str]] = {}
    try:
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), make_handler(viewer, lambda: holder["hosts"])
        )
    except OSError as e:
        raise UserError(f"cannot serve on 127.0.0.1:{port}: {e.strerror or e}") from None
    bound = server.server_address[1]
    holder["hosts"] = {f"127.0.0.1:{bound}", f"localhost:{bound}"}
    server.daemon_threads = True
    return server


def serve(root: str | Path, port: int, announce: Callable[[str], None] = print) -> None:
    """Serve the viewer of an output root on 127.0.0.1 until interrupted."""
    if not Path(root).is_dir():
        raise UserError(f"no runs directory {root} (give --root)")
    server = make_server(root, port)
    announce(f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a viewer is stopped: not an error
        pass
    finally:
        server.server_close()


def serve_in_thread(root: str | Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A viewer serving in a background thread (for tests and notebooks): the server and its base URL."""
    server = make_server(root, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"
