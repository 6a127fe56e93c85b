"""A picture of a game's tree of full states with the planner's values and chosen actions (PNG)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from maskscope.mutual_value.solver import MutualValueResult

MAX_DRAWN = 80


def _select_states(result: MutualValueResult, max_states: int) -> tuple[list[int], bool]:
    """States to draw: all reachable from the start if few enough, else the planner's path and its
    immediate alternatives, in breadth-first order, cut at ``max_states``."""
    space = result.space
    everything = np.flatnonzero(space.reachable())
    if len(everything) <= max_states:
        keep = set(everything.tolist())
        truncated = False
    else:
        on_path = set(np.flatnonzero(space.reachable(result.policy)).tolist())
        keep = set(on_path)
        for c in range(space.n_choices):
            if int(space.choice_state[c]) in on_path:
                keep.update(int(d) for d in space.edge_dst[space.edge_choice == c])
        truncated = True
    order: list[int] = []
    seen = {0}
    queue = deque([0])
    while queue and len(order) < max_states:
        s = queue.popleft()
        order.append(s)
        for c in space.choices(s):
            for d in space.edge_dst[space.edge_choice == c]:
                d = int(d)
                if d in keep and d not in seen:
                    seen.add(d)
                    queue.append(d)
    return order, truncated or len(order) < len(keep)


def _edges(result: MutualValueResult, states: list[int]) -> dict[tuple[int, int], dict[str, object]]:
    """Drawn edges keyed by (from, to); parallel moves are merged into one edge with all their labels."""
    space = result.space
    drawn = set(states)
    edges: dict[tuple[int, int], dict[str, object]] = {}
    for s in states:
        chance = space.game.kinds[int(space.node[s])] == "chance"
        for c in space.choices(s):
            for e in np.flatnonzero(space.edge_choice == c):
                d = int(space.edge_dst[e])
                if d not in drawn:
                    continue
                item = edges.setdefault((s, d), {"labels": [], "chosen": False, "chance": chance})
                labels = item["labels"]
                assert isinstance(labels, list)
                label = f"{space.edge_p[e]:g}" if chance else space.choice_label[c]
                if chance:
                    labels[:] = (
                        [f"{sum(float(v) for v in labels) + float(space.edge_p[e]):g}"] if labels else [label]
                    )
                elif label not in labels:
                    labels.append(label)
                item["chosen"] = bool(item["chosen"]) or (not chance and result.policy[c] > 0)
    return edges


def _layout(
    states: list[int], edges: dict[tuple[int, int], dict[str, object]], acyclic: bool
) -> dict[int, tuple[float, float]]:
    """Depth on the x axis (longest path from the start when the graph is acyclic, else breadth-first
    depth); the leaves of a spanning tree spread on the y axis, parents centred on their children."""
    succ: dict[int, list[int]] = {s: [] for s in states}
    indeg = dict.fromkeys(states, 0)
    for a, b in edges:
        if a != b:
            succ[a].append(b)
            indeg[b] += 1
    depth = {states[0]: 0}
    if acyclic:
        queue = deque(s for s in states if indeg[s] == 0)
        while queue:
            s = queue.popleft()
            for d in succ[s]:
                depth[d] = max(depth.get(d, 0), depth.get(s, 0) + 1)
                indeg[d] -= 1
                if indeg[d] == 0:
                    queue.append(d)
    else:
        for s in states:  # breadth-first order
            for d in succ[s]:
                depth.setdefault(d, depth[s] + 1)
    children: dict[int, list[int]] = {s: [] for s in states}
    placed = {states[0]}
    for s in states:
        for d in succ[s]:
            if d not in placed and (not acyclic or depth[d] == depth[s] + 1):
                placed.add(d)
                children[s].append(d)
    for s in states:  # anything not hung under a parent yet
        if s not in placed:
            placed.add(s)
            children[states[0]].append(s)
    ypos: dict[int, float] = {}
    counter = 0.0
    stack: list[tuple[int, bool]] = [(states[0], False)]
    while stack:
        node, expanded = stack.pop()
        kids = children[node]
        if not kids:
            ypos[node] = counter
            counter += 1
        elif not expanded:
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
        else:
            ypos[node] = float(np.mean([ypos[k] for k in kids]))
    return {s: (float(depth.get(s, 0)), -ypos[s]) for s in states}


def _num(v: float) -> str:
    if not np.isfinite(v):
        return "diverges" if np.isnan(v) else f"{v}"
    return "0" if abs(v) < 1e-12 else f"{v:.3g}"


def plot_game(result: MutualValueResult, out: Path, max_states: int = MAX_DRAWN) -> Path:
    """Draw the game's states with V_X, V_Y and the planner's chosen actions, and save a PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    space = result.space
    game = space.game
    states, truncated = _select_states(result, max_states)
    edges = _edges(result, states)
    pos = _layout(states, edges, acyclic=not game.cyclic)
    width = max(pos.values(), key=lambda p: p[0])[0] + 1
    height = -min(pos.values(), key=lambda p: p[1])[1] + 1
    fig, ax = plt.subplots(figsize=(min(3.2 * width + 1, 40), min(1.0 * height + 1.5, 60)))
    kinds = {"decision": "#fff6d5", "chance": "#dbeafe", "terminal": "#e5e7eb"}
    stays: dict[int, str] = {}
    for (a, b), item in edges.items():
        if a == b:
            stays[a] = " / ".join(str(v) for v in item["labels"]) + (" (chosen)" if item["chosen"] else "")
            continue
        (x0, y0), (x1, y1) = pos[a], pos[b]
        chance, chosen = bool(item["chance"]), bool(item["chosen"])
        back = x1 <= x0
        color = "#2563eb" if chance else "#16a34a" if chosen else "#b0b0b0"
        ax.annotate(
            "",
            xy=(x1 - 0.28, y1),
            xytext=(x0 + 0.28, y0),
            arrowprops={
                "arrowstyle": "->",
                "color": color,
                "lw": 2.2 if chosen else 1.0,
                "linestyle": "--" if chance else "-",
                "connectionstyle": "arc3,rad=0.35" if back else "arc3,rad=0.0",
            },
        )
        labels = item["labels"]
        assert isinstance(labels, list)
        ax.text(
            x0 + 0.45 * (x1 - x0) + (0.0 if not back else 0.3),
            y0 + 0.45 * (y1 - y0) + (0.45 if back else 0.06),
            " / ".join(labels),
            fontsize=6.5,
            color=color,
            ha="center",
            va="bottom",
        )
    for s, (x, y) in pos.items():
        node = int(space.node[s])
        text = (
            f"{game.node_names[node]}\nx={space.x[s]:.4g}  y={space.y[s]:.4g}\n"
            f"Vx={_num(result.values_x[s])}  Vy={_num(result.values_y[s])}"
        )
        if s in stays:
            text += f"\nstay: {stays[s]}"
        ax.text(
            x,
            y,
            text,
            fontsize=7,
            ha="center",
            va="center",
            bbox={"boxstyle": "round,pad=0.3", "fc": kinds[game.kinds[node]], "ec": "#555555"},
        )
    title = (
        f"{game.name} ({result.definition.value}, ties {result.ties}): {result.status.value}   "
        f"m_X={_num(result.price_x)}  m_Y={_num(result.price_y)}  sqrt|ab|={result.gain:.3g}   "
        "(green: planner's choice; blue dashed: chance)"
    )
    if truncated:
        title += f"\nshowing {len(pos)} of the reachable states"
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height + 0.4, 0.8)
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
