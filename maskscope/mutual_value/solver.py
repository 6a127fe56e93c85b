"""The mutual-value planner: a damped fixed-point iteration between a policy and the values of X and Y.

Given a policy, every state s has
  G_X(s), G_Y(s)      expected discounted future increments of X and Y,
  B_Y(s) = G_Y(s) - G_Y(s with x reset to baseline)    the Y that the X held at s brings,
  B_X(s) = G_X(s) - G_X(s with y reset to baseline)    the X that the Y held at s brings.
At the start state the marginal values (value per unit above baseline) m_X, m_Y must satisfy
  m_X = a * m_Y,  m_Y = b * m_X,   a = B_Y(start) / (x0 - b_X),  b = B_X(start) / (y0 - b_Y),
i.e. m = M m with M = [[0, a], [b, 0]]. The values are V_X(s) = m_Y B_Y(s) / rho and
V_Y(s) = m_X B_X(s) / rho, where rho is the round-trip gain (eigenvalue of M for m). The policy moves
to the successors with the largest expected V_X + V_Y. docs/mutual-value.md has the derivation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from maskscope.mutual_value.space import StateSpace


class Status(StrEnum):
    """How the fixed-point iteration ended."""

    CONVERGED = "converged"
    SCALE_FREE = "scale-free"
    ZERO = "zero"
    OSCILLATING = "oscillating"
    MAX_ITERATIONS = "max-iterations"


@dataclass
class RoundTrip:
    """What holdings bring under one policy: B_X, B_Y per state, and the per-unit rates a, b at the start."""

    brought_x: np.ndarray
    brought_y: np.ndarray
    y_per_x: float
    x_per_y: float

    @property
    def matrix(self) -> np.ndarray:
        """M = [[0, a], [b, 0]]: marginal values must satisfy m = M m."""
        return np.array([[0.0, self.y_per_x], [self.x_per_y, 0.0]])


@dataclass
class MutualValueResult:
    """Outcome of :func:`solve`: status, marginal values, per-state values and the policy."""

    space: StateSpace
    status: Status
    message: str
    iterations: int
    price_x: float
    price_y: float
    gain: float
    round_trip: RoundTrip
    values_x: np.ndarray
    values_y: np.ndarray
    policy: np.ndarray
    q: np.ndarray
    cycle_length: int | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def values(self) -> np.ndarray:
        """V_X + V_Y per state."""
        return self.values_x + self.values_y

    def chosen(self, s: int) -> list[str]:
        """Names of the actions the planner takes at state ``s`` (several when it is indifferent)."""
        return [self.space.choice_label[c] for c in self.space.choices(s) if self.policy[c] > 0]


def round_trip(space: StateSpace, w: np.ndarray) -> RoundTrip:
    """B_X, B_Y and the start's per-unit rates a (Y per unit X) and b (X per unit Y) under policy ``w``."""
    gx, gy = space.discounted_gains(w)
    brought_y = gy - gy[space.cf_x]
    brought_x = gx - gx[space.cf_y]
    s0 = 0
    bx, by = space.game.baseline
    dx = space.x[s0] - bx if space.unit_x == s0 else 1.0
    dy = space.y[s0] - by if space.unit_y == s0 else 1.0
    return RoundTrip(
        brought_x=brought_x,
        brought_y=brought_y,
        y_per_x=float(brought_y[space.unit_x] / dx),
        x_per_y=float(brought_x[space.unit_y] / dy),
    )


def successor_q(space: StateSpace, values_x: np.ndarray, values_y: np.ndarray) -> np.ndarray:
    """For each choice, the expected V_X + V_Y of the state it leads to."""
    return space.choice_expectation((values_x + values_y)[space.edge_dst])


def _normalise(m: np.ndarray) -> np.ndarray:
    m = m / np.abs(m).sum()
    total = m.sum()
    if total < -1e-12 or (abs(total) <= 1e-12 and m[0] < 0):
        m = -m
    return m


def _policy_period(policies: list[bytes], max_period: int = 8, repeats: int = 3) -> int | None:
    """The period p >= 2 with which the last ``repeats`` * p policies cycle, if they do."""
    for p in range(2, max_period + 1):
        window = policies[-repeats * p :]
        if len(window) < repeats * p or len(set(window[:p])) < 2:
            continue
        if all(window[i] == window[i - p] for i in range(p, len(window))):
            return p
    return None


def solve(
    space: StateSpace,
    damping: float = 0.5,
    max_iterations: int = 200,
    tol: float = 1e-10,
    zero_tol: float = 1e-9,
    scale_tol: float = 1e-6,
) -> MutualValueResult:
    """Find the mutual-value policy and values by damped fixed-point iteration; never more than
    ``max_iterations`` rounds. ``damping`` is the weight of the new estimate in each update (0 < d <= 1)."""
    if not 0 < damping <= 1:
        raise ValueError("damping must be in (0, 1]")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    m = np.array([0.5, 0.5])
    w = space.uniform_policy()
    seen: dict[tuple[bytes, tuple[float, float]], int] = {}
    policies: list[bytes] = []
    history: list[tuple[float, float, int]] = []
    status = Status.MAX_ITERATIONS
    cycle: int | None = None
    same_runs = 0
    rt = round_trip(space, w)
    it = 0
    for it in range(1, max_iterations + 1):
        rt = round_trip(space, w)
        mm = rt.matrix @ m
        size = np.abs(mm).sum()
        target = mm / size if size > zero_tol else m
        mixed = (1 - damping) * m + damping * target
        if np.abs(mixed).sum() < 1e-12:  # the update exactly reverses m: take the other eigen-direction
            mixed = np.array([m[0], -m[1]])
        m_new = _normalise(mixed)
        w_new = space.greedy(successor_q(space, m_new[1] * rt.brought_y, m_new[0] * rt.brought_x))
        changed = int(np.count_nonzero(np.abs(w_new - w) > 1e-12))
        history.append((float(m_new[0]), float(m_new[1]), changed))
        delta = float(np.abs(m_new - m).sum())
        same_runs = same_runs + 1 if changed == 0 else 0
        if changed == 0 and delta <= tol:
            m, w = m_new, w_new
            status = Status.CONVERGED
            break
        if same_runs >= 2 and rt.y_per_x * rt.x_per_y < -zero_tol:
            m, w = m_new, w_new
            status = Status.OSCILLATING
            break
        key = (np.round(w_new, 12).tobytes(), (round(float(m_new[0]), 9), round(float(m_new[1]), 9)))
        policies.append(key[0])
        period = _policy_period(policies)
        if key in seen and it - seen[key] >= 2:
            period = it - seen[key]
        if period is not None:
            m, w = m_new, w_new
            status = Status.OSCILLATING
            cycle = period
            break
        seen[key] = it
        m, w = m_new, w_new
    rt = round_trip(space, w)
    mm = rt.matrix @ m
    gain = float(mm @ m / (m @ m))
    a, b = rt.y_per_x, rt.x_per_y
    rates = f"one unit of X brings {a:.4g} Y and one unit of Y brings {b:.4g} X"
    if status == Status.CONVERGED and gain <= zero_tol:
        status = Status.ZERO
    elif status == Status.CONVERGED and abs(gain - 1) <= scale_tol:
        status = Status.SCALE_FREE
    if status == Status.ZERO:
        zeros = np.zeros(space.n_states)
        return MutualValueResult(
            space=space,
            status=status,
            message=(
                f"{rates}, so the round trip X -> Y -> X brings nothing back: the only consistent values "
                "are zero and the planner is indifferent everywhere"
            ),
            iterations=it,
            price_x=0.0,
            price_y=0.0,
            gain=0.0,
            round_trip=rt,
            values_x=zeros,
            values_y=zeros.copy(),
            policy=space.uniform_policy(),
            q=np.zeros(space.n_choices),
            history=history,
        )
    scale = 1.0 / gain if abs(gain) > zero_tol else 1.0
    vx = m[1] * rt.brought_y * scale
    vy = m[0] * rt.brought_x * scale
    if status == Status.CONVERGED:
        message = (
            f"settled after {it} iterations; {rates}, round-trip gain rho = {gain:.4g}; the unscaled "
            "definition holds only with every value zero, so the values are its normalised solution "
            "(divided by rho)"
        )
    elif status == Status.SCALE_FREE:
        message = (
            f"settled after {it} iterations; {rates}, round-trip gain rho = 1: the definition holds exactly, "
            "and so does any multiple of these values (defined only up to scale; shown with "
            "|m_X| + |m_Y| = 1)"
        )
    elif status == Status.OSCILLATING and cycle is None:
        message = (
            f"{rates}: the round trip has negative gain (a*b < 0), so the values rotate without settling; "
            f"stopped after {it} iterations"
        )
    elif status == Status.OSCILLATING:
        message = (
            f"the policy cycles with period {cycle} (each policy makes another one look better); "
            f"stopped after {it} iterations; last estimate shown"
        )
    else:
        message = f"no fixed point within {max_iterations} iterations; last estimate shown"
    return MutualValueResult(
        space=space,
        status=status,
        message=message,
        iterations=it,
        price_x=float(m[0]),
        price_y=float(m[1]),
        gain=gain,
        round_trip=rt,
        values_x=vx,
        values_y=vy,
        policy=w,
        q=successor_q(space, vx, vy),
        cycle_length=cycle,
        history=history,
    )
