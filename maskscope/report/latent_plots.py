"""Plots of the `latent` experiment: P(right) without the password per method, with the password ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maskscope.report import plain_text, save_figure  # noqa: E402

METHOD_COLORS = {
    "none": "#555555",
    "password": "#1e8449",
    "mask": "#2e86c1",
    "shots": "#d68910",
    "finetune": "#8e44ad",
    "noise": "#c0392b",
}


def _bounds(v: dict[str, Any]) -> tuple[float, float, float]:
    mean = np.nan if v["mean"] is None else float(v["mean"])
    if not v.get("ci95"):
        return mean, mean, mean
    return mean, float(v["ci95"][0]), float(v["ci95"][1])


@plain_text
def latent_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """latent.png: per method (one bar per row of the table), the mean exact P(right answer) without the
    password with its 95% interval over items; the password's figure as the ceiling line and `none` as the
    floor line. For the noise and fine-tuning rows, a dot marks the best seed (the max over seeds)."""
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(rows)))
    y = np.arange(len(rows))[::-1]
    stats = [_bounds(r["p_right"]) for r in rows]
    mean = np.array([s[0] for s in stats])
    err = np.clip(np.vstack([mean - [s[1] for s in stats], [s[2] for s in stats] - mean]), 0, None)
    colors = [METHOD_COLORS.get(r["method"], "#777777") for r in rows]
    ax.barh(y, mean, xerr=err, color=colors, capsize=3, height=0.7)
    for yi, r in zip(y, rows, strict=True):
        best = r.get("max_over_seeds")
        if best:
            ax.plot(best["p_right"]["mean"], yi, "k^", markersize=5)
    by_method = {r["method"]: r for r in rows}
    if "password" in by_method:
        ceiling = by_method["password"]["p_right"]["mean"]
        ax.axvline(
            ceiling, color=METHOD_COLORS["password"], linestyle="--", label="with the password (ceiling)"
        )
    ax.axvline(
        by_method["none"]["p_right"]["mean"], color="black", linestyle=":", label="none (the question alone)"
    )
    if any(r.get("max_over_seeds") for r in rows):
        ax.plot([], [], "k^", label="best seed (max over seeds)")
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.set_xlim(0, max(1e-3, float(np.nanmax(np.concatenate([mean, [s[2] for s in stats]])))) * 1.1)
    ax.set_xlabel("P(right answer) without the password, exact (mean over items, 95% interval)")
    ax.set_title(f"{summary['name']}: latent capability ({summary['items']} items)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "latent.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
