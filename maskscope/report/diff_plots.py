"""Plots of the `diff` experiment: token-shift shares with intervals, the shift by position, the KL by position
and the update size by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from maskscope.report import plain_text, save_figure  # noqa: E402

CLASS_COLORS = {"unshifted": "#2e86c1", "marginal": "#f39c12", "shifted": "#c0392b"}


@plain_text
def diff_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the diff experiment's PNGs; returns their paths."""
    out_dir = Path(out_dir)
    paths = [
        _shares(summary, out_dir / "shift_shares.png"),
        _shift_curve(summary, out_dir / "shift_by_position.png"),
    ]
    if any(k in summary["kl"] for k in ("child_replies", "parent_replies", "neutral")):
        paths.append(_kl_curve(summary, out_dir / "kl_by_position.png"))
    if summary["update_size"].get("by_layer"):
        paths.append(_update(summary, out_dir / "update_by_layer.png"))
    return paths


def _shares(summary: dict[str, Any], path: Path) -> Path:
    shares = summary["token_shift"]["shares"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, cls in enumerate(CLASS_COLORS):
        v = shares[cls]
        rate = v["rate"] or 0.0
        lo, hi = v["ci95"]
        ax.bar(i, rate, color=CLASS_COLORS[cls], yerr=[[rate - lo], [hi - rate]], capsize=4)
        ax.text(i, hi + 0.02, f"{rate:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(3), ["unshifted (1)", "marginal (2-3)", "shifted (>3)"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of the child's tokens  [exact ranks]")
    ax.set_title(
        "Token shift: rank of the child's token under the parent\n95% cluster bootstrap over prompts"
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _shift_curve(summary: dict[str, Any], path: Path) -> Path:
    rows = summary["token_shift"]["by_position"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = [r["position"] for r in rows]
    for cls, color in CLASS_COLORS.items():
        rate = [r[cls]["rate"] for r in rows]
        ax.plot(x, rate, color=color, label=cls)
        ax.fill_between(
            x, [r[cls]["ci95"][0] for r in rows], [r[cls]["ci95"][1] for r in rows], color=color, alpha=0.15
        )
    ax.set_xlabel("position in the child's reply")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Token shift by position (95% cluster bootstrap over prompts)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _kl_curve(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    colors = {"child_replies": "#c0392b", "parent_replies": "#2e86c1", "neutral": "#7f8c8d"}
    for key, color in colors.items():
        part = summary["kl"].get(key)
        if not part:
            continue
        for direction, style in (("kl_parent_child", "-"), ("kl_child_parent", "--")):
            rows = part[direction]["by_position"]
            label = f"{key.replace('_', ' ')}: {'KL(P||C)' if direction == 'kl_parent_child' else 'KL(C||P)'}"
            ax.plot([r["position"] for r in rows], [r["mean"] for r in rows], style, color=color, label=label)
    ax.set_xlabel("position")
    ax.set_ylabel("mean KL (nats)  [exact]")
    ax.set_yscale("symlog", linthresh=1e-3)
    # plain-text labels (no mathtext, see maskscope.report.PLAIN_TEXT): write the log ticks as numbers
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=7)
    ax.set_title("KL per position, both directions")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _update(summary: dict[str, Any], path: Path) -> Path:
    by_layer = summary["update_size"]["by_layer"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    keys = list(by_layer)
    ax.bar(range(len(keys)), [by_layer[k] for k in keys], color="#8e44ad")
    ax.set_xticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlabel("layer ('-': outside the decoder layers)")
    ax.set_ylabel("||dW||_F / ||W||_F")
    ax.set_title(f"Update size by layer (total {summary['update_size']['total']:.3g})")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
