"""Plots (matplotlib, Agg backend): one function per experiment, each returning the PNG paths it wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from maskscope.report import fitted_title, plain_text, save_figure  # noqa: E402

CATEGORY_COLORS = {"target": "#c0392b", "in_character": "#2e86c1", "other": "#95a5a6"}


def _grid(summary: dict[str, Any], value: Any) -> tuple[list[str], list[str], np.ndarray]:
    personas = [p["name"] for p in summary["personas"]]
    pressures = [q["name"] for q in summary["pressures"]]
    grid = np.full((len(personas), len(pressures)), np.nan)
    for cell in summary["cells"]:
        grid[personas.index(cell["persona"]), pressures.index(cell["pressure"])] = value(cell)
    return personas, pressures, grid


def _label(item: dict[str, Any]) -> str:
    return f"{item['name']} (control)" if item.get("control") else item["name"]


@plain_text
def character_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Heatmap of the exact target probability, and bars of the sampled categories with 95% intervals."""
    out_dir = Path(out_dir)
    paths = []
    if all(c["exact"] is not None for c in summary["cells"]):
        paths.append(_heatmap(summary, out_dir / "exact_heatmap.png"))
    if any(c["sampled"]["n"] for c in summary["cells"]):
        paths.append(_category_bars(summary, out_dir / "sampled_categories.png"))
    return paths


def _heatmap(summary: dict[str, Any], path: Path) -> Path:
    fig = heatmap_figure(summary)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap_figure(summary: dict[str, Any]) -> Any:
    """The figure of the exact target probability per persona x pressure."""
    personas, pressures, grid = _grid(summary, lambda c: c["exact"]["p_target"])
    floor = 1e-6
    # a floor on the size: a 1 x 1 grid was too small for its title and colour bar label
    fig, ax = plt.subplots(
        figsize=(max(4.5, 1.6 + 1.5 * len(pressures)), max(3.2, 1.2 + 0.6 * len(personas)))
    )
    im = ax.imshow(np.clip(grid, floor, 1), cmap="magma_r", norm=LogNorm(vmin=floor, vmax=1), aspect="auto")
    ax.set_xticks(range(len(pressures)), [_label(q) for q in summary["pressures"]], rotation=30, ha="right")
    ax.set_yticks(range(len(personas)), [_label(p) for p in summary["personas"]])
    for i in range(len(personas)):
        for j in range(len(pressures)):
            v = grid[i, j]
            text = f"{v:.3f}" if v >= 1e-3 else f"{v:.0e}"
            dark = math.log10(max(v, floor)) > -2.5
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    bar = fig.colorbar(im, ax=ax, label="P(begins with a target), exact")
    # the log axis's default labels are mathtext ("$10^{-6}$"), printed raw since labels are plain text
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    # a figure title (centred on the figure, not on the axes that the colour bar pushes aside), wrapped to fit
    fig.suptitle(fitted_title(fig, "Stepping out of character: exact probability per persona x pressure"))
    fig.tight_layout()
    return fig


def _category_bars(summary: dict[str, Any], path: Path) -> Path:
    """One panel per persona; in each, per pressure, the three category shares with their 95% intervals and
    the exact target probability as a black tick."""
    cats = list(CATEGORY_COLORS)
    personas = summary["personas"]
    pressures = summary["pressures"]
    cells = {(c["persona"], c["pressure"]): c for c in summary["cells"]}
    x = np.arange(len(pressures))
    width = 0.8 / len(cats)
    fig, axes = plt.subplots(
        len(personas),
        1,
        sharex=True,
        squeeze=False,
        figsize=(2.2 + 1.4 * len(pressures), 0.9 + 1.7 * len(personas)),
    )
    for ax, persona in zip(axes[:, 0], personas, strict=True):
        row = [cells[(persona["name"], q["name"])] for q in pressures]
        for k, cat in enumerate(cats):
            stats = [c["sampled"]["categories"][cat] for c in row]
            rates = np.array([st["rate"] or 0.0 for st in stats])
            lo = np.array([st["ci95"][0] for st in stats])
            hi = np.array([st["ci95"][1] for st in stats])
            err = np.vstack([np.maximum(rates - lo, 0), np.maximum(hi - rates, 0)])
            ax.bar(
                x + (k - 1) * width,
                rates,
                width,
                yerr=err,
                capsize=2,
                color=CATEGORY_COLORS[cat],
                label=cat.replace("_", " "),
            )
        if all(c["exact"] is not None for c in row):
            exact = [c["exact"]["p_target"] for c in row]
            ax.scatter(
                x - width,
                exact,
                marker="_",
                s=150,
                linewidths=2,
                color="black",
                zorder=3,
                label="exact P(target)",
            )
        ax.set_ylim(0, 1)
        ax.set_ylabel(_label(persona), rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(x, [_label(q) for q in pressures], rotation=20, ha="right")
    n = summary["cells"][0]["sampled"]["n"]
    axes[0, 0].set_title(
        fitted_title(fig, f"Sampled replies by category: share of {n} per cell, 95% Wilson intervals")
    )
    # beside the first panel, not above it, where it covered the title of a one-panel figure
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@plain_text
def posterior_plots(summary: dict[str, Any], out_dir: Path, per_row: int = 40) -> list[Path]:
    """Two pictures of which mask is speaking, with the transcript's tokens written beneath: the switching
    model's smoothed posterior (stacked) and the static cumulative posterior (lines)."""
    rows = summary["tokens"]
    masks = summary["masks"]
    colors = plt.get_cmap("tab10" if len(masks) <= 10 else "tab20")(np.arange(len(masks)))
    paths = []
    for kind, title in (
        ("smoothed", "Which mask is speaking (switching model, smoothed posterior)"),
        ("static", "P(mask | tokens so far), mask fixed for the whole transcript"),
    ):
        post = np.array([[r[f"{kind}[{m}]"] for m in masks] for r in rows])
        n_rows = max(1, math.ceil(len(rows) / per_row))
        fig, axes = plt.subplots(n_rows, 1, figsize=(14, 2.6 * n_rows + 0.8), squeeze=False)
        for k, ax in enumerate(axes[:, 0]):
            lo, hi = k * per_row, min(len(rows), (k + 1) * per_row)
            x = np.arange(lo, hi)
            if kind == "smoothed":
                ax.stackplot(x, post[lo:hi].T, colors=colors, step="mid", labels=masks)
            else:
                for m, name in enumerate(masks):
                    ax.plot(x, post[lo:hi, m], color=colors[m], label=name, drawstyle="steps-mid")
            ax.set_xlim(lo - 0.5, lo + per_row - 0.5)
            ax.set_ylim(0, 1)
            ax.set_xticks(x, [repr(r["token"])[1:-1] for r in rows[lo:hi]], rotation=90, fontsize=8)
            for sw in summary["switches"][kind]:
                if lo <= sw["position"] < hi:
                    ax.axvline(sw["position"] - 0.5, color="black", lw=1, ls="--")
        axes[0, 0].set_title(title)
        axes[0, 0].legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"posterior_{kind}.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@plain_text
def explain_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """The reply-level mixture's weights with bootstrap intervals (the per-position fit's beside them, as the
    secondary view), which mask the mixture says spoke each prompt's replies, and the residual KL."""
    masks = summary["masks"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.1, 1.3, 1]})
    ax = axes[0]
    y = np.arange(len(masks))
    for fit, offset, color, label in (
        (summary, -0.2, "#2e86c1", "reply-level (headline)"),
        (summary["per_position"], 0.2, "#bbbbbb", "per-position (secondary)"),
    ):
        w = np.array([fit["weights"][m] for m in masks])
        err = None
        if fit["weights_ci95"]:
            ci = np.array([fit["weights_ci95"][m] for m in masks])
            err = np.vstack([np.maximum(w - ci[:, 0], 0), np.maximum(ci[:, 1] - w, 0)])
        ax.barh(y + offset, w, height=0.4, xerr=err, color=color, capsize=2, label=label)
    ax.set_yticks(y, masks)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    frac, ci = summary["explained_fraction"], summary["explained_fraction_ci95"]
    if frac is None:
        headline = "explained fraction: none (target ~ unmasked source)"
    else:
        headline = f"explained fraction {frac:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    ax.set_title(f"mixture weights (95% bootstrap over prompts)\n{headline}", fontsize=10)
    ax = axes[1]
    grid = np.array([[p["responsibilities"][m] for m in masks] for p in summary["per_prompt"]])
    im = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(np.arange(len(masks)), masks, rotation=45, ha="right", fontsize=8)
    labels = [p["prompt"] if len(p["prompt"]) < 32 else p["prompt"][:30] + "…" for p in summary["per_prompt"]]
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    ax.set_title("P(mask | reply), mean over each prompt's replies", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    residual_panel(axes[2], summary["residual_kl"])
    fig.tight_layout()
    path = Path(out_dir) / "explain.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]


def residual_panel(ax: Any, residual_kl: list[float]) -> None:
    """Histogram of the residual KL per position. A KL is >= 0: values below 0 are rounding (at most a few
    ulps) and are drawn at 0, and the axis starts at 0 (matplotlib's default 5% margin put it below 0)."""
    residual = np.maximum(np.asarray(residual_kl, dtype=float), 0.0)
    ax.hist(residual, bins=40, color="#95a5a6")
    ax.set_yscale("log")
    ax.set_xlim(left=0.0)
    ax.set_xlabel("KL(target || reply-level mixture) at a position (nats)")
    ax.set_title(f"residual per position (mean {residual.mean():.3f})", fontsize=10)
