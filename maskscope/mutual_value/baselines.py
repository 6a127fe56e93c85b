"""The boring planners (maximise discounted X + Y, X, or Y) and where the mutual-value planner differs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskscope.mutual_value.solver import MutualValueResult
from maskscope.mutual_value.space import StateSpace

BASELINES: dict[str, tuple[float, float]] = {"x+y": (1.0, 1.0), "x": (1.0, 0.0), "y": (0.0, 1.0)}


@dataclass
class BaselineResult:
    """An optimal policy for discounted c_X * X + c_Y * Y gained, with its values."""

    name: str
    weights: tuple[float, float]
    policy: np.ndarray
    values: np.ndarray
    q: np.ndarray
    iterations: int

    def chosen(self, space: StateSpace, s: int) -> list[str]:
        """Names of the actions this baseline takes at state ``s`` (several when tied)."""
        return [space.choice_label[c] for c in space.choices(s) if self.policy[c] > 0]


def solve_baseline(
    space: StateSpace, name: str, weights: tuple[float, float], max_iterations: int = 1000
) -> BaselineResult:
    """Policy iteration for the discounted sum of weights . (dX, dY); ties are split evenly."""
    reward = weights[0] * space.edge_dx + weights[1] * space.edge_dy
    gamma = space.game.gamma
    w = space.uniform_policy()
    values = space.evaluate(w, reward)
    q = space.choice_expectation(reward + gamma * values[space.edge_dst])
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        w_new = space.greedy(q)
        if np.allclose(w_new, w, atol=1e-12, rtol=0):
            break
        w = w_new
        values = space.evaluate(w, reward)
        q = space.choice_expectation(reward + gamma * values[space.edge_dst])
    return BaselineResult(name=name, weights=weights, policy=w, values=values, q=q, iterations=iterations)


def solve_baselines(space: StateSpace) -> list[BaselineResult]:
    """All three boring baselines on ``space``."""
    return [solve_baseline(space, name, wts) for name, wts in BASELINES.items()]


@dataclass
class Difference:
    """One decision state where the planner and a baseline choose differently, and why."""

    state: int
    planner: list[str]
    baseline: list[str]
    reason: str


@dataclass
class Comparison:
    """Where the mutual-value planner and one baseline part ways."""

    baseline: str
    compared: int
    differences: list[Difference]
    first_move_differs: bool

    @property
    def summary(self) -> str:
        """One line: how many on-path decisions differ."""
        if not self.differences:
            return (
                f"same choices as max {self.baseline} at all {self.compared} decision states on either path"
            )
        first = " (including the first move)" if self.first_move_differs else ""
        return (
            f"differs from max {self.baseline} at {len(self.differences)} of {self.compared} "
            f"decision states on either path{first}"
        )


def _fmt_names(names: list[str]) -> str:
    return "/".join(repr(n) for n in names) if len(names) > 1 else repr(names[0])


def _reason(
    space: StateSpace,
    result: MutualValueResult,
    vx: np.ndarray,
    vy: np.ndarray,
    base: BaselineResult,
    s: int,
    planner: list[str],
    other: list[str],
) -> str:
    cs = list(space.choices(s))
    labels = [space.choice_label[c] for c in cs]
    p_name = next((n for n in planner if n not in other), planner[0])
    b_name = next((n for n in other if n not in planner), other[0])
    p_c = cs[labels.index(p_name)]
    b_c = cs[labels.index(b_name)]
    metric = f"discounted {base.name.upper()} gained"
    base_part = (
        f"max {base.name} takes {_fmt_names(other)} ({metric} {base.q[b_c]:.3g} vs {base.q[p_c]:.3g} "
        f"for {p_name!r})"
    )
    if not (np.isfinite(result.q[p_c]) and np.isfinite(result.q[b_c])):
        return f"the planner's values do not exist ({result.status.value}: no finite values); " + base_part
    if len(planner) == len(cs):
        return (
            "the planner is indifferent (every action leads to holdings worth "
            f"V_X+V_Y = {result.q[p_c]:.3g}); " + base_part
        )
    if len(other) == len(cs):
        base_part = f"max {base.name} is indifferent ({metric} {base.q[b_c]:.3g} for every action)"
    elif set(planner) < set(other):
        base_part = (
            f"max {base.name} finds {_fmt_names(other)} equally good ({metric} {base.q[b_c]:.3g} each) "
            "and the planner does not"
        )
    dvx = vx[p_c] - vx[b_c]
    dvy = vy[p_c] - vy[b_c]
    driver = "the X held afterwards brings more Y" if dvx >= dvy else "the Y held afterwards brings more X"
    return (
        f"the planner takes {_fmt_names(planner)}: V_X+V_Y {result.q[p_c]:.3g} vs {result.q[b_c]:.3g} "
        f"for {b_name!r} (V_X {dvx:+.3g}, V_Y {dvy:+.3g}: {driver}); " + base_part
    )


def compare(result: MutualValueResult, base: BaselineResult) -> Comparison:
    """The decision states reachable from the start under either policy where the two choose differently."""
    space = result.space
    on_path = space.reachable(result.policy) | space.reachable(base.policy)
    states = [s for s in np.flatnonzero(on_path) if space.is_decision(int(s))]
    diffs: list[Difference] = []
    vx = space.choice_expectation(result.values_x[space.edge_dst])
    vy = space.choice_expectation(result.values_y[space.edge_dst])
    for s in states:
        s = int(s)
        mine = result.chosen(s)
        theirs = base.chosen(space, s)
        if set(mine) != set(theirs):
            diffs.append(Difference(s, mine, theirs, _reason(space, result, vx, vy, base, s, mine, theirs)))
    return Comparison(
        baseline=base.name,
        compared=len(states),
        differences=diffs,
        first_move_differs=any(d.state == 0 for d in diffs),
    )
