"""Plots (matplotlib) and the HTML report (jinja2, autoescape on: model output is data)."""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape

from maskscope.files import atomic_write, atomic_write_text

F = TypeVar("F", bound=Callable[..., Any])

# Labels in plots come from specs and models: text, never markup. Without this, a persona named `$\alpha^{$`
# goes to matplotlib's mathtext parser and the plot (and every rerun) fails after all results are computed.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def plain_text(fn: F) -> F:
    """Run a plotting function with every label drawn as plain text (no mathtext, no TeX)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def fitted_title(fig: Any, text: str, fontsize: float = 12.0) -> str:
    """A title wrapped into lines that fit the figure's width (a small grid makes a narrow figure, and a
    one-line title was cut at both edges)."""
    chars = max(12, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


def save_figure(fig: Any, path: Path, dpi: int, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (a temporary file renamed over the target)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt, **kwargs), path.name)


def _missing_as_dash(value: Any) -> Any:
    """A missing value (None) is printed as an en dash, never as the word "None"."""
    return "–" if value is None else value


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("maskscope", "report/templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        finalize=_missing_as_dash,
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
    return atomic_write_text(Path(out_dir) / "report.html", html, "report.html")
