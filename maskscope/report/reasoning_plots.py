"""Plots of the reasoning experiments (matplotlib, Agg backend): cot curves, capabilities by mask, and what
follows a forced answer. Each function returns the PNG paths it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maskscope.reasoning.text import slug  # noqa: E402
from maskscope.report import fitted_title, plain_text, save_figure  # noqa: E402

COLORS = {
    "truncated": "#1f4e79",
    "summarized": "#2e8b57",
    "paraphrased": "#d68910",
    "filler:dots": "#7f8c8d",
    "filler:lorem": "#b03a2e",
}
PANELS = (
    ("steps", "p_agree", "P(forced answer = full-CoT answer), exact: step cuts (Lanham's axis)",
     "% of the CoT's steps given"),
    ("tokens", "p_agree", "P(forced answer = full-CoT answer), exact: token grid (not Lanham's axis)",
     "% of the stored CoT's tokens given"),
    ("steps", "free_agree", "free continuation agrees with the full-CoT answer",
     "% of the CoT's steps given"),
    ("mistake", None, "mistake planted in one step: agreement with the full-CoT answer",
     "% of the steps before the mistaken one"),
)  # fmt: skip


def _err(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Error-bar lengths below and above; never negative (a bootstrap interval need not hold the pooled
    share it is drawn beside)."""
    return np.clip(np.vstack([mean - lo, hi - mean]), 0.0, None)


def _series(curve: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in curve], dtype=float)
    lo = np.array([np.nan if not c.get("ci95") else c["ci95"][0] for c in curve], dtype=float)
    hi = np.array([np.nan if not c.get("ci95") else c["ci95"][1] for c in curve], dtype=float)
    return mean, lo, hi


def _line(ax: Any, grid: np.ndarray, curve: list[dict[str, Any]], label: str, color: Any, **kw: Any) -> None:
    mean, lo, hi = _series(curve)
    ok = ~np.isnan(mean)
    if not ok.any():
        return
    if ok.sum() <= 2 and kw.get("points"):
        ax.errorbar(
            grid[ok], mean[ok], yerr=_err(mean[ok], lo[ok], hi[ok]), fmt="s",
            color=color, capsize=3, label=label,
        )  # fmt: skip
        return
    ax.plot(grid[ok], mean[ok], kw.get("style", "-"), marker="o", ms=3, lw=kw.get("lw", 1.5), color=color,
            label=label)  # fmt: skip
    band = ok & ~np.isnan(lo)
    ax.fill_between(grid[band], lo[band], hi[band], color=color, alpha=0.12, linewidth=0)


def _aoc_label(name: str, aoc: dict[str, Any] | None) -> str:
    if not aoc or aoc.get("mean") is None:
        return name
    return f"{name} (AOC {aoc['mean']:.2f})"


@plain_text
def cot_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure per task: the exact probability of the full-CoT answer against the fraction of steps
    given (Lanham's curve, AOC in the legend) and, separately, against the token grid; free agreement on the
    step axis; and agreement against where a planted mistake is. Bands: 95% bootstrap over questions; the
    no-CoT value as a dotted line."""
    out_dir = Path(out_dir)
    grid = np.array(summary["grid"]) * 100
    paths = []
    for task in summary["tasks"]:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
        for ax, (axis, metric, title, xlabel) in zip(axes.flat, PANELS, strict=True):
            if axis == "mistake":
                m = task.get("mistake")
                if m:
                    for key, name, color in (
                        ("p_agree", "P(full-CoT answer), forced (exact)", "#1f4e79"),
                        ("free_agree", "free answer = full-CoT answer", "#b03a2e"),
                        ("p_correct", "P(right answer), forced (exact)", "#2e8b57"),
                    ):
                        aoc = (
                            m["aoc"]["forced" if key == "p_agree" else "free"] if key != "p_correct" else None
                        )
                        _line(ax, grid, m["by_position"][key], _aoc_label(name, aoc), color)
                else:
                    ax.text(
                        0.5, 0.5, "no mistake condition", ha="center", va="center", transform=ax.transAxes
                    )
            else:
                for name, cond in task["conditions"].items():
                    curves = cond["curves"].get(axis)
                    if not curves:
                        continue
                    mode = "forced" if metric == "p_agree" else "free"
                    label = _aoc_label(name, cond["aoc"].get(axis, {}).get(mode))
                    _line(ax, grid, curves[metric], label, COLORS.get(name), points=name.startswith("filler"))
                base = task["no_cot"][metric]["mean"]
                if base is not None:
                    ax.axhline(base, color="black", linestyle=":", linewidth=1.2, label="no CoT (baseline)")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_xlim(-3, 103)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        greedy = "greedy" if summary["spec"]["temperature"] == 0 else f"T={summary['spec']['temperature']}"
        fig.suptitle(
            f"{task['label']}: is the chain of thought load-bearing?  (n={task['n']} questions, {greedy}; "
            "bands: 95% bootstrap over questions)",
            fontsize=11,
        )
        fig.tight_layout()
        path = out_dir / task["plot"]
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@plain_text
def capabilities_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure per task: per mask, sampled accuracy (Wilson interval, or a cluster bootstrap over problems
    when problems have several replies) and the exact mean probability of the right answer (bootstrap
    interval); where the answer set is small, the chance level and the range that giving one answer every
    time scores on this set."""
    out_dir = Path(out_dir)
    paths = []
    masks = summary["mask_defs"]
    for task in summary["tasks"]:
        fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(masks), 4.5))
        x = np.arange(len(masks))
        width = 0.38
        rows = [task["by_mask"][m["name"]] for m in masks]
        acc = [r["sampled"]["accuracy"] for r in rows]
        rate = np.array([a["rate"] if a["rate"] is not None else np.nan for a in acc])
        err = _err(rate, np.array([a["ci95"][0] for a in acc]), np.array([a["ci95"][1] for a in acc]))
        kind = "greedy" if summary["spec"]["temperature"] == 0 else "sampled"
        ax.bar(
            x - width / 2, rate, width, yerr=err, capsize=3, color="#2e86c1", label=f"replies right ({kind})"
        )
        pc = [r["exact"]["p_correct"] for r in rows]
        mean = np.array([p["mean"] if p["mean"] is not None else np.nan for p in pc])
        lo = np.array([p["ci95"][0] if p.get("ci95") else np.nan for p in pc])
        hi = np.array([p["ci95"][1] if p.get("ci95") else np.nan for p in pc])
        ax.bar(
            x + width / 2,
            mean,
            width,
            yerr=_err(mean, lo, hi),
            capsize=3,
            color="#c0392b",
            label="P(right answer), direct (exact)",
        )
        if task.get("chance") is not None:
            ax.axhline(task["chance"], color="black", linestyle=":", label="chance")
        shares = task.get("answer_shares")
        if shares:
            ax.axhspan(
                min(shares.values()),
                max(shares.values()),
                color="black",
                alpha=0.08,
                label="one answer every time (rarest to commonest)",
            )
        labels = [f"{m['name']} (control)" if m.get("control") else m["name"] for m in masks]
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share / probability")
        ax.set_title(
            fitted_title(fig, f"{task['label']}: capability by mask (n={task['n']})", 10), fontsize=10
        )
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"capabilities_{slug(task['label'])}.png"
        save_figure(fig, path, dpi=110, bbox_inches="tight")  # nothing cut at the edges of a one-mask figure
        plt.close(fig)
        paths.append(path)
    return paths


@plain_text
def prefill_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per forced prefill: the exact probability that the reply goes on with a self-correction marker, and
    the sampled categories of what follows (Wilson intervals)."""
    out_dir = Path(out_dir)
    prefills = summary["prefills"]
    cats = summary["categories"]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2 * len(prefills), 4.5), squeeze=False)
    x = np.arange(len(prefills))
    ax = axes[0, 0]
    p = [summary["by_prefill"][q["name"]]["exact"]["p_marker"] for q in prefills]
    mean = np.array([v["mean"] for v in p], dtype=float)
    lo = np.array([v["ci95"][0] if v.get("ci95") else np.nan for v in p])
    hi = np.array([v["ci95"][1] if v.get("ci95") else np.nan for v in p])
    ax.bar(x, mean, 0.6, yerr=_err(mean, lo, hi), capsize=3, color="#8e44ad")
    ax.set_xticks(x, [q["name"] for q in prefills], rotation=20, ha="right")
    ax.set_ylabel("mean exact P(next words are a marker)")
    positive = mean[np.isfinite(mean) & (mean > 0)]
    if len(positive) > 1 and positive.max() > 30 * positive.min():  # bars orders of magnitude apart
        ax.set_yscale("log")
        ax.set_ylabel("mean exact P(next words are a marker), log scale")
    ax.set_title("Self-correction markers right after the prefill (exact)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[0, 1]
    width = 0.8 / max(len(cats), 1)
    palette = plt.get_cmap("tab10")
    for k, cat in enumerate(cats):
        stats = [summary["by_prefill"][q["name"]]["sampled"]["categories"][cat] for q in prefills]
        rate = np.array([s["rate"] if s["rate"] is not None else np.nan for s in stats])
        err = _err(rate, np.array([s["ci95"][0] for s in stats]), np.array([s["ci95"][1] for s in stats]))
        ax.bar(
            x + (k - (len(cats) - 1) / 2) * width,
            rate,
            width,
            yerr=err,
            capsize=2,
            color=palette(k),
            label=cat,
        )
    ax.set_xticks(x, [q["name"] for q in prefills], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("What follows (sampled, 95% Wilson)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "prefill.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
