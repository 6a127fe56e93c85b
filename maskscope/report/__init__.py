"""Plots (matplotlib) and the HTML report (jinja2, autoescape on: model output is data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("maskscope", "report/templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )


def render_report(summary: dict[str, Any], out_dir: Path) -> Path:
    """Write report.html for a summary; every string that came from a model or a spec is escaped."""
    from maskscope import __version__

    template = _environment().get_template(f"{summary['experiment']}.html")
    cells = {(c["persona"], c["pressure"]): c for c in summary.get("cells", [])}
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(summary.get("masks", []))}
    html = template.render(
        s=summary,
        cells=cells,
        colors=colors,
        spec_yaml=yaml.safe_dump(summary["spec"], sort_keys=False, allow_unicode=True),
        version=__version__,
    )
    path = Path(out_dir) / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
