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
from maskscope.report import plain_text, save_figure  # noqa: E402

COLORS = {
    "truncated": "#1f4e79",
    "summarized": "#2e8b57",
    "paraphrased": "#d68910",
    "filler:dots": "#7f8c8d",
    "filler:lorem": "#b03a2e",
}
PANELS = (
    ("forced_correct", "accuracy, forced answer", (0, 1)),
    ("free_correct", "accuracy, free continuation", (0, 1)),
    ("forced_agree", "agreement with the full-CoT answer (forced)", (0, 1)),
    ("further_tokens", "further tokens used (free continuation)", None),
)


def _series(curve: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in curve], dtype=float)
    lo = np.array([np.nan if not c.get("ci95") else c["ci95"][0] for c in curve], dtype=float)
    hi = np.array([np.nan if not c.get("ci95") else c["ci95"][1] for c in curve], dtype=float)
    return mean, lo, hi


@plain_text
def cot_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure per task: accuracy (forced and free), agreement and further tokens vs % of CoT given, a
    line per condition with its 95% bootstrap band; the no-CoT baseline as a dotted line on every panel."""
    out_dir = Path(out_dir)
    grid = np.array(summary["grid"]) * 100
    paths = []
    for task in summary["tasks"]:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
        fillers = [name for name in task["conditions"] if name.startswith("filler")]
        for ax, (metric, title, ylim) in zip(axes.flat, PANELS, strict=True):
            for name, cond in task["conditions"].items():
                mean, lo, hi = _series(cond["curves"][metric])
                if np.all(np.isnan(mean)):
                    continue
                color = COLORS.get(name, None)
                ok = ~np.isnan(mean)
                style = "--" if cond.get("interpolated") else "-"
                label = f"{name} (step fn.)" if cond.get("interpolated") else name
                # fillers often coincide (with each other and the baseline): nudge their markers sideways
                # and draw the later ones thinner, so that every one stays visible
                nth = fillers.index(name) if name in fillers else None
                shift = 0.0 if nth is None else 1.6 * (nth - (len(fillers) - 1) / 2)
                if ok.sum() == 1 or (
                    name.startswith("filler") and metric in ("free_correct", "further_tokens")
                ):
                    ax.errorbar(
                        grid[ok] + shift,
                        mean[ok],
                        yerr=np.vstack([mean[ok] - lo[ok], hi[ok] - mean[ok]]),
                        fmt="s",
                        color=color,
                        capsize=3,
                        label=label,
                    )
                else:
                    width = 1.5 if nth is None else 3.0 - 1.2 * nth
                    ax.plot(
                        grid[ok],
                        mean[ok],
                        style,
                        marker="o",
                        ms=3,
                        lw=max(width, 0.8),
                        color=color,
                        label=label,
                    )
                    band = ok & ~np.isnan(lo)
                    ax.fill_between(grid[band], lo[band], hi[band], color=color, alpha=0.12, linewidth=0)
            base = task["no_cot"][metric]["mean"]
            if base is not None:
                ax.axhline(base, color="black", linestyle=":", linewidth=1.2, label="no CoT (baseline)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("% of the stored CoT given")
            ax.set_xlim(-3, 103)
            if ylim:
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8, loc="best")
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
    """One figure per task: per mask, sampled accuracy (Wilson interval) and the exact mean probability of
    the right answer (bootstrap interval); where the answer set is small, the chance level and the range
    that giving one answer every time scores on this set."""
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
        err = np.vstack(
            [rate - np.array([a["ci95"][0] for a in acc]), np.array([a["ci95"][1] for a in acc]) - rate]
        )
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
            yerr=np.vstack([mean - lo, hi - mean]),
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
        ax.set_title(f"{task['label']}: capability by mask (n={task['n']})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"capabilities_{slug(task['label'])}.png"
        save_figure(fig, path, dpi=110)
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
    ax.bar(x, mean, 0.6, yerr=np.vstack([mean - lo, hi - mean]), capsize=3, color="#8e44ad")
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
        err = np.vstack(
            [rate - np.array([s["ci95"][0] for s in stats]), np.array([s["ci95"][1] for s in stats]) - rate]
        )
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
