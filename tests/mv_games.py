"""Games shared by the mutual-value tests: hand-computable games, the symmetric-game reproducer, and
hypothesis strategies for small random trees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

GAMES = Path(__file__).resolve().parent.parent / "examples" / "games"

# Sell-and-buy: hold 2 X; sell all X for 3 Y each, or hold; then buy X back one for one, or stop.
SELL_AND_BUY: dict[str, Any] = {
    "name": "sell-and-buy",
    "gamma": 0.5,
    "start": {"node": "a", "x": 2, "y": 0},
    "nodes": {
        "a": {
            "actions": {
                "sell": {"to": "b", "convert": {"from": "x", "to": "y", "rate": 3}},
                "hold": {"to": "b"},
            }
        },
        "b": {
            "actions": {
                "buy": {"to": "end", "convert": {"from": "y", "to": "x", "rate": 1}},
                "stop": {"to": "end"},
            }
        },
        "end": {},
    },
}

# Tools and bread: invest (X + 1) or consume (Y + 2); then, half the time, each X bakes one Y.
TOOLS: dict[str, Any] = {
    "name": "tools",
    "gamma": 1.0,
    "start": {"node": "d", "x": 1, "y": 0},
    "nodes": {
        "d": {"actions": {"invest": {"to": "e", "add": {"x": 1}}, "consume": {"to": "e", "add": {"y": 2}}}},
        "e": {
            "outcomes": [
                {"p": 0.5, "to": "end", "produce": {"from": "x", "to": "y", "rate": 1}},
                {"p": 0.5, "to": "end"},
            ]
        },
        "end": {},
    },
}


def coin(rate_yx: float) -> dict[str, Any]:
    """A single coin: heads each X makes 2 Y, tails each Y makes ``rate_yx`` X. Start (1, 1)."""
    return {
        "name": "coin",
        "gamma": 1.0,
        "start": {"node": "c", "x": 1, "y": 1},
        "nodes": {
            "c": {
                "outcomes": [
                    {"p": 0.5, "to": "end", "produce": {"from": "x", "to": "y", "rate": 2}},
                    {"p": 0.5, "to": "end", "produce": {"from": "y", "to": "x", "rate": rate_yx}},
                ]
            },
            "end": {},
        },
    }


EFFECTS = st.one_of(
    st.builds(lambda dx, dy: {"add": {"x": dx, "y": dy}}, st.integers(-1, 2), st.integers(-1, 2)),
    st.builds(
        lambda s, r, cap: {"convert": {"from": s, "to": "y" if s == "x" else "x", "rate": r, **cap}},
        st.sampled_from(["x", "y"]),
        st.sampled_from([0.5, 1.0, 2.0]),
        st.sampled_from([{}, {"max": 1}]),
    ),
    st.builds(
        lambda s, t, r: {"produce": {"from": s, "to": t, "rate": r}},
        st.sampled_from(["x", "y"]),
        st.sampled_from(["x", "y"]),
        st.sampled_from([0.5, 1.0]),
    ),
)


@st.composite
def random_trees(draw: st.DrawFn, constant_only: bool = False, symmetric: bool = False) -> dict[str, Any]:
    """A small acyclic game: nodes n0..n{k-1} then a terminal, each move going to a later node."""
    k = draw(st.integers(1, 4))
    names = [f"n{i}" for i in range(k)] + ["end"]
    effects = (
        st.builds(lambda dx, dy: {"add": {"x": dx, "y": dy}}, st.integers(-1, 2), st.integers(-1, 2))
        if constant_only
        else EFFECTS
    )
    nodes: dict[str, Any] = {"end": {}}
    for i in range(k):
        later = st.sampled_from(names[i + 1 :])
        if draw(st.booleans()) or symmetric:
            acts = {}
            for j in range(draw(st.integers(1, 3))):
                eff = draw(effects)
                acts[f"a{j}"] = {"to": draw(later), **eff}
                if symmetric:
                    acts[f"a{j}-swapped"] = {"to": acts[f"a{j}"]["to"], **swap_effect(eff)}
            nodes[names[i]] = {"actions": acts}
        else:
            p = draw(st.sampled_from([0.25, 0.5]))
            nodes[names[i]] = {
                "outcomes": [
                    {"p": p, "to": draw(later), **draw(effects)},
                    {"p": 1 - p, "to": draw(later), **draw(effects)},
                ]
            }
    x0 = draw(st.integers(0, 2))
    y0 = x0 if symmetric else draw(st.integers(0, 2))
    return {
        "name": "random",
        "gamma": draw(st.sampled_from([0.5, 0.9, 1.0])),
        "start": {"node": "n0", "x": x0, "y": y0},
        "nodes": nodes,
    }


def swap_effect(eff: dict[str, Any]) -> dict[str, Any]:
    other = {"x": "y", "y": "x"}
    out: dict[str, Any] = {}
    for kind, body in eff.items():
        if kind == "add":
            out[kind] = {"x": body["y"], "y": body["x"]}
        else:
            out[kind] = {**body, "from": other[body["from"]], "to": other[body["to"]]}
    return out


# MUTUAL_VALUE_EXAMPLES=500 runs a longer search; MUTUAL_VALUE_RANDOM=1 draws new examples on every run (the


# A game symmetric in X and Y (every action has a mirrored twin) on which each resource destroys the other
# under the symmetric policy (a = b < 0): the exchange reading has two mirror-image solutions and none that
# is symmetric. Found by a random property run; kept as a regression example.
SYMMETRIC_REPRODUCER: dict[str, Any] = json.loads(
    '{"name":"r","gamma":0.5,"start":{"node":"n0","x":1,"y":1},"nodes":{"end":{},"n0":{"actions":{"a0":'
    '{"to":"n1","add":{"x":-1,"y":1}},"a0-swapped":{"to":"n1","add":{"x":1,"y":-1}},"a1":{"to":"n2",'
    '"convert":{"from":"y","to":"x","rate":2.0,"max":1}},"a1-swapped":{"to":"n2","convert":{"from":"x",'
    '"to":"y","rate":2.0,"max":1}}}},"n1":{"actions":{"a0":{"to":"n2","produce":{"from":"x","to":"x",'
    '"rate":0.5}},"a0-swapped":{"to":"n2","produce":{"from":"y","to":"y","rate":0.5}}}},"n2":{"actions":'
    '{"a0":{"to":"end","convert":{"from":"y","to":"x","rate":0.5}},"a0-swapped":{"to":"end","convert":'
    '{"from":"x","to":"y","rate":0.5}},"a1":{"to":"end","add":{"x":2,"y":2}},"a1-swapped":{"to":"end",'
    '"add":{"x":2,"y":2}}}}}}'
)


def state_index(space: Any, node: str, x: float, y: float) -> int:
    """The index of the full state (node, x, y) in ``space``."""
    n = space.game.node_index(node)
    hits = [s for s in range(space.n_states) if space.node[s] == n and space.x[s] == x and space.y[s] == y]
    assert len(hits) == 1, (node, x, y)
    return hits[0]


def copy(spec: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a game given as plain data."""
    return json.loads(json.dumps(spec))


def apply_effect(eff: dict[str, Any], x: float, y: float) -> tuple[float, float]:
    """The amounts after a move's effect, read straight from the game's plain data (no bounds)."""
    v = {"x": float(x), "y": float(y)}
    for r, amount in (eff.get("set") or {}).items():
        v[r] = float(amount)
    for r, amount in (eff.get("add") or {}).items():
        v[r] += float(amount)
    for kind in ("convert", "produce"):
        items = eff.get(kind) or []
        for c in [items] if isinstance(items, dict) else items:
            if kind == "convert":
                moved = max(0.0, v[c["from"]] if "max" not in c else min(v[c["from"]], c["max"]))
                v[c["from"]] -= moved
                v[c["to"]] += c["rate"] * moved
            else:
                v[c["to"]] += c["rate"] * v[c["from"]]
    return v["x"], v["y"]


def gains_by_recursion(
    spec: dict[str, Any], weight: Any, node: str, x: float, y: float
) -> tuple[float, float]:
    """G_X, G_Y of the full state (node, x, y) of an acyclic game, by recursion over the plain data;
    ``weight(node, x, y, action)`` is the policy's probability of an action."""
    gamma = float(spec.get("gamma", 1.0))
    body = spec["nodes"][node]
    if body.get("actions"):
        moves = [(weight(node, x, y, name), act) for name, act in body["actions"].items()]
    elif body.get("outcomes"):
        moves = [(o["p"], o) for o in body["outcomes"]]
    else:
        return 0.0, 0.0
    gx = gy = 0.0
    for w, eff in moves:
        if w == 0:
            continue
        nx, ny = apply_effect(eff, x, y)
        cx, cy = gains_by_recursion(spec, weight, eff["to"], nx, ny)
        gx += w * ((nx - x) + gamma * cx)
        gy += w * ((ny - y) + gamma * cy)
    return gx, gy


# Found by a random run: a symmetric game on which the exchange reading, from the symmetric start, must choose
# a sign (a = b < 0) and then settles on an asymmetric fixed point; its mirror image is found only by making
# the other sign choice from the same start.
SYMMETRIC_SIGN_CHOICE: dict[str, Any] = {
    "name": "random",
    "gamma": 0.9,
    "start": {"node": "n0", "x": 1, "y": 1},
    "nodes": {
        "end": {},
        "n0": {
            "actions": {
                "a0": {"to": "n1", "add": {"x": 1, "y": 2}},
                "a0-swapped": {"to": "n1", "add": {"x": 2, "y": 1}},
                "a1": {"to": "n1", "convert": {"from": "x", "to": "y", "rate": 0.5}},
                "a1-swapped": {"to": "n1", "convert": {"from": "y", "to": "x", "rate": 0.5}},
                "a2": {"to": "n2", "add": {"x": 0, "y": 1}},
                "a2-swapped": {"to": "n2", "add": {"x": 1, "y": 0}},
            }
        },
        "n1": {
            "actions": {
                "a0": {"to": "n2", "add": {"x": 0, "y": -1}},
                "a0-swapped": {"to": "n2", "add": {"x": -1, "y": 0}},
            }
        },
        "n2": {
            "actions": {
                "a0": {"to": "end", "add": {"x": 0, "y": 0}},
                "a0-swapped": {"to": "end", "add": {"x": 0, "y": 0}},
                "a1": {"to": "n3", "produce": {"from": "x", "to": "y", "rate": 0.5}},
                "a1-swapped": {"to": "n3", "produce": {"from": "y", "to": "x", "rate": 0.5}},
            }
        },
        "n3": {
            "actions": {
                "a0": {"to": "end", "produce": {"from": "x", "to": "y", "rate": 0.5}},
                "a0-swapped": {"to": "end", "produce": {"from": "y", "to": "x", "rate": 0.5}},
            }
        },
    },
}
