"""The mutual-value planner: a fixed-point iteration between a policy and the values of X and Y.

Given a policy, every state s has
  G_X(s), G_Y(s)      expected discounted future increments of X and Y,
  B_Y(s) = G_Y(s) - G_Y(s with x reset to baseline)    the Y that the X held at s brings,
  B_X(s) = G_X(s) - G_X(s with y reset to baseline)    the X that the Y held at s brings.
At the start, one unit of X brings a units of Y and one unit of Y brings b units of X: by default the
one-unit counterfactual a = G_Y(node, x, y) - G_Y(node, x - 1, y) (the marginal reading), or B_Y / (x - b_X)
(the average per unit above baseline). With M = [[0, a], [b, 0]] the marginal values m = (m_X, m_Y) solve

  intrinsic (default)  m = u + M m            unique, m = (I - M)^-1 u = sum_k M^k u, while sqrt|ab| < 1
  exchange             m = M m / rho          the eigenvector of the largest real eigenvalue rho = sqrt(ab)
  literal              m = M m                zero, or (when rho = 1 exactly) any multiple of the eigenvector

and the values of the holdings at s are V_X(s) = u_X (x - b_X) + m_Y B_Y(s), V_Y(s) = u_Y (y - b_Y) + m_X B_X(s)
(u = 0 and a division by rho in the exchange reading). The policy moves to the successors with the largest
expected V_X + V_Y; ties between actions are broken by an explicit rule. docs/mutual-value.md has the
derivation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from maskscope.errors import UserError
from maskscope.mutual_value.readings import Definition, PerUnit
from maskscope.mutual_value.space import StateSpace, check_tie_rule


class Status(StrEnum):
    """How the solve ended, classified by the eigenvalues +-sqrt(ab) of M under the final policy."""

    CONVERGED = "converged"
    SCALE_FREE = "scale-free"
    ZERO = "zero"
    MONEY_PUMP = "money-pump"
    DESTRUCTIVE = "destructive"
    ROTATING = "rotating"
    OSCILLATING = "oscillating"
    MAX_ITERATIONS = "max-iterations"


#: Statuses at which the policy settled (a fixed point of the iteration, with or without finite values).
SETTLED = frozenset(
    {Status.CONVERGED, Status.SCALE_FREE, Status.ZERO, Status.MONEY_PUMP, Status.DESTRUCTIVE, Status.ROTATING}
)

DEFAULT_START = (0.5, 0.5)


@dataclass
class RoundTrip:
    """What holdings bring under one policy: B_X, B_Y per state, and the per-unit rates a, b at the start."""

    brought_x: np.ndarray
    brought_y: np.ndarray
    y_per_x: float
    x_per_y: float

    @property
    def matrix(self) -> np.ndarray:
        """M = [[0, a], [b, 0]]: what one unit of each resource brings of the other."""
        return np.array([[0.0, self.y_per_x], [self.x_per_y, 0.0]])

    @property
    def radius(self) -> float:
        """The spectral radius sqrt(|ab|) of M: the round-trip gain per leg."""
        return math.sqrt(abs(self.y_per_x * self.x_per_y))

    @property
    def eigenvalues(self) -> tuple[complex, complex]:
        """The eigenvalues of M, +-sqrt(ab) (imaginary when ab < 0)."""
        root = complex(self.y_per_x * self.x_per_y) ** 0.5
        return (root, -root)


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
    definition: Definition = Definition.INTRINSIC
    per_unit: PerUnit = PerUnit.MARGINAL
    ties: str = "even"
    intrinsic: tuple[float, float] = (1.0, 1.0)
    start: tuple[float, float] = DEFAULT_START
    cycle_length: int | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def values(self) -> np.ndarray:
        """V_X + V_Y per state."""
        return self.values_x + self.values_y

    @property
    def settled(self) -> bool:
        """Whether the policy reached a fixed point of the iteration."""
        return self.status in SETTLED

    def chosen(self, s: int) -> list[str]:
        """Names of the actions the planner takes at state ``s`` (several when it splits a tie)."""
        return [self.space.choice_label[c] for c in self.space.choices(s) if self.policy[c] > 0]

    def plan(self) -> dict[int, tuple[str, ...]]:
        """The chosen actions at every decision state the planner can reach from the start."""
        space = self.space
        return {
            int(s): tuple(self.chosen(int(s)))
            for s in np.flatnonzero(space.reachable(self.policy))
            if space.is_decision(int(s))
        }


def round_trip(space: StateSpace, w: np.ndarray, per_unit: PerUnit | str = PerUnit.MARGINAL) -> RoundTrip:
    """B_X, B_Y and the start's per-unit rates a (Y per unit X) and b (X per unit Y) under policy ``w``:
    one-unit counterfactuals (``per_unit="marginal"``) or averages over the units above baseline."""
    gx, gy = space.discounted_gains(w)
    brought_y = gy - gy[space.cf_x]
    brought_x = gx - gx[space.cf_y]
    if PerUnit(per_unit) == PerUnit.MARGINAL:
        if space.step_x[0] < 0 or space.step_y[0] < 0:
            raise UserError(
                f"{space.game.source}: the bounds leave no room for one unit more or less at the start, so "
                "the marginal values are undefined (use --per-unit average)"
            )
        (hx, lx), (hy, ly) = space.step_x, space.step_y
        a = (gy[hx] - gy[lx]) / (space.x[hx] - space.x[lx])
        b = (gx[hy] - gx[ly]) / (space.y[hy] - space.y[ly])
    else:
        bx, by = space.game.baseline
        dx = space.x[0] - bx if space.unit_x == 0 else 1.0
        dy = space.y[0] - by if space.unit_y == 0 else 1.0
        a = brought_y[space.unit_x] / dx
        b = brought_x[space.unit_y] / dy
    return RoundTrip(brought_x=brought_x, brought_y=brought_y, y_per_x=float(a), x_per_y=float(b))


def successor_q(space: StateSpace, values_x: np.ndarray, values_y: np.ndarray) -> np.ndarray:
    """For each choice, the expected V_X + V_Y of the state it leads to."""
    return space.choice_expectation((values_x + values_y)[space.edge_dst])


def state_values(
    space: StateSpace,
    rt: RoundTrip,
    m: np.ndarray,
    intrinsic: tuple[float, float],
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """V_X, V_Y per state: intrinsic value of the holding above baseline plus the value (at the marginal
    values ``m``) of what it brings, the latter multiplied by ``scale``."""
    bx, by = space.game.baseline
    vx = intrinsic[0] * (space.x - bx) + m[1] * rt.brought_y * scale
    vy = intrinsic[1] * (space.y - by) + m[0] * rt.brought_x * scale
    return vx, vy


def exchange_direction(
    a: float, b: float, near: np.ndarray, zero_tol: float = 1e-9, x_positive: bool = True
) -> np.ndarray | None:
    """The eigenvector (|m_X| + |m_Y| = 1) of M's largest real eigenvalue sqrt(ab), with the sign nearer
    ``near`` (when both are equally near: m_X > 0 if ``x_positive``, else m_Y > 0); None when ab <= 0 (no
    positive real eigenvalue)."""
    if a * b <= zero_tol:
        return None
    v = np.array([a / math.sqrt(a * b), 1.0])
    v /= np.abs(v).sum()
    if a > 0:
        return v
    dot = float(v @ near)
    if abs(dot) <= 1e-12:
        return v if (v[0] > 0) == x_positive else -v
    return v if dot > 0 else -v


def intrinsic_solution(a: float, b: float, u: tuple[float, float]) -> np.ndarray | None:
    """m = (I - M)^-1 u = sum_k M^k u when the series converges (sqrt|ab| < 1), else None."""
    if abs(a * b) >= 1.0:
        return None
    return np.linalg.solve(np.eye(2) - np.array([[0.0, a], [b, 0.0]]), np.asarray(u, dtype=float))


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
    definition: Definition | str = Definition.INTRINSIC,
    intrinsic: tuple[float, float] = (1.0, 1.0),
    per_unit: PerUnit | str = PerUnit.MARGINAL,
    ties: str = "even",
    start: tuple[float, float] = DEFAULT_START,
    x_positive: bool | None = None,
    damping: float = 0.5,
    max_iterations: int = 200,
    tol: float = 1e-10,
    zero_tol: float = 1e-9,
    scale_tol: float = 1e-6,
) -> MutualValueResult:
    """Find a mutual-value policy and its values under one reading of the definition and one tie rule,
    starting from the marginal values ``start`` and the tie rule's indifferent policy (where the sign of
    the exchange reading's answer is open, m_X > 0 if ``x_positive``, else m_Y > 0; by default
    ``x_positive`` is start_X >= start_Y); never more than
    ``max_iterations`` rounds. ``damping`` is the weight of the new estimate in each update (0 < d <= 1)."""
    definition = Definition(definition)
    per_unit = PerUnit(per_unit)
    ties = check_tie_rule(ties)
    if not 0 < damping <= 1:
        raise ValueError("damping must be in (0, 1]")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if not all(math.isfinite(v) for v in intrinsic):
        raise UserError("the intrinsic values must be finite numbers")
    u = (0.0, 0.0) if definition != Definition.INTRINSIC else (float(intrinsic[0]), float(intrinsic[1]))
    exchange = definition != Definition.INTRINSIC
    m = np.asarray(start, dtype=float)
    if exchange:
        if not np.abs(m).sum() > 0:
            raise ValueError("the start of the exchange reading must be non-zero")
        m = m / np.abs(m).sum()
    if x_positive is None:  # the sign choice when a = b < 0 leaves it open
        x_positive = start[0] >= start[1]
    w = space.indifferent_policy(ties)
    seen: dict[tuple[bytes, tuple[float, ...]], int] = {}
    policies: list[bytes] = []
    history: list[tuple[float, float, int]] = []
    status = Status.MAX_ITERATIONS
    cycle: int | None = None
    pump_runs = 0
    it = 0
    for it in range(1, max_iterations + 1):
        rt = round_trip(space, w, per_unit)
        a, b = rt.y_per_x, rt.x_per_y
        target = (
            exchange_direction(a, b, m, zero_tol, x_positive) if exchange else intrinsic_solution(a, b, u)
        )
        pump = not exchange and target is None
        if pump:  # the series sum_k M^k u diverges under w: follow its partial sums
            m_new = np.asarray(u) + rt.matrix @ m
        else:
            m_new = m if target is None else (1 - damping) * m + damping * target
        if exchange:
            m_new = m_new / np.abs(m_new).sum()  # target . m >= 0, so the mix never cancels
        vx, vy = state_values(space, rt, m_new, u)
        w_new = space.greedy(successor_q(space, vx, vy), ties=ties)
        changed = int(np.count_nonzero(np.abs(w_new - w) > 1e-12))
        history.append((float(m_new[0]), float(m_new[1]), changed))
        delta = float(np.abs(m_new - m).sum())
        settled = changed == 0 and delta <= tol * (1.0 + float(np.abs(m).sum()))
        pump_runs = pump_runs + 1 if pump else 0
        if pump_runs >= 3 and not settled:
            # three rounds in a row under policies whose value diverges: report the last of them
            m, status = m_new, Status.MONEY_PUMP
            break
        m, w = m_new, w_new
        if settled:
            status = Status.CONVERGED
            break
        key = (np.round(w, 12).tobytes(), tuple(np.round(m, 9).tolist()))
        policies.append(key[0])
        period = _policy_period(policies)
        if key in seen and it - seen[key] >= 2:
            period = it - seen[key]
        if period is not None:
            status = Status.OSCILLATING
            cycle = period
            break
        seen[key] = it
    return _finish(
        space,
        definition,
        per_unit,
        ties,
        u,
        start,
        x_positive,
        m,
        w,
        status,
        it,
        cycle,
        history,
        zero_tol,
        scale_tol,
        max_iterations,
    )


def _finish(
    space: StateSpace,
    definition: Definition,
    per_unit: PerUnit,
    ties: str,
    u: tuple[float, float],
    start: tuple[float, float],
    x_positive: bool,
    m: np.ndarray,
    w: np.ndarray,
    status: Status,
    it: int,
    cycle: int | None,
    history: list[tuple[float, float, int]],
    zero_tol: float,
    scale_tol: float,
    max_iterations: int,
) -> MutualValueResult:
    """Classify a finished iteration by the eigenvalues of M and compute the values it reports."""
    rt = round_trip(space, w, per_unit)
    a, b = rt.y_per_x, rt.x_per_y
    ab = a * b
    radius = rt.radius
    rates = f"one unit of X brings {a:.4g} Y and one unit of Y brings {b:.4g} X ({per_unit.value})"
    nan = np.full(space.n_states, np.nan)
    scale = 1.0
    if status == Status.CONVERGED:
        if definition == Definition.INTRINSIC:
            exact = intrinsic_solution(a, b, u)
            if exact is None or radius >= 1 - scale_tol:
                status = Status.MONEY_PUMP
            else:
                m = exact
        elif abs(ab) <= zero_tol:
            status = Status.ZERO
        elif ab < 0:
            status = Status.ROTATING
        else:
            direction = exchange_direction(a, b, m, zero_tol, x_positive)
            assert direction is not None
            m = direction
            scale = 1.0 / radius
            if a < 0:
                status = Status.DESTRUCTIVE
            elif abs(radius - 1) <= scale_tol:
                status = Status.SCALE_FREE
        if definition == Definition.LITERAL and status != Status.SCALE_FREE and status in SETTLED:
            before = status
            status = Status.ZERO
            w = space.indifferent_policy(ties)
            rates += f"; the exchange reading settles as {before.value} with rho = {radius:.4g}"
    prices = (float(m[0]), float(m[1]))
    if status in (Status.ZERO, Status.MONEY_PUMP, Status.ROTATING):
        if status == Status.ZERO:
            vx, vy = state_values(space, rt, np.zeros(2), u)
            if definition != Definition.INTRINSIC:
                w = space.indifferent_policy(ties)
            prices = (0.0, 0.0)
        else:
            vx, vy = nan, nan.copy()
            prices = (math.nan, math.nan)
        q = successor_q(space, vx, vy)
    else:
        vx, vy = state_values(space, rt, m, u, scale)
        q = successor_q(space, vx, vy)
    message = _message(definition, status, rates, ab, radius, it, cycle, max_iterations, a)
    return MutualValueResult(
        space=space,
        status=status,
        message=message,
        iterations=it,
        price_x=prices[0],
        price_y=prices[1],
        gain=radius,
        round_trip=rt,
        values_x=vx,
        values_y=vy,
        policy=w,
        q=q,
        definition=definition,
        per_unit=per_unit,
        ties=ties,
        intrinsic=u,
        start=(float(start[0]), float(start[1])),
        cycle_length=cycle,
        history=history,
    )


def _message(
    definition: Definition,
    status: Status,
    rates: str,
    ab: float,
    radius: float,
    it: int,
    cycle: int | None,
    max_iterations: int,
    a: float,
) -> str:
    settled = f"settled after {it} iterations; {rates}"
    if status == Status.CONVERGED and definition == Definition.INTRINSIC:
        return (
            f"{settled}; round-trip gain sqrt|ab| = {radius:.4g} < 1, so m = u + M m has the unique "
            "solution (I - M)^-1 u = sum_k M^k u"
        )
    if status == Status.CONVERGED:
        return (
            f"{settled}; round-trip gain rho = {radius:.4g}: the only self-consistent exchange rate is "
            "m_X : m_Y = sqrt(a/b) (the literal definition holds only with every value zero)"
        )
    if status == Status.SCALE_FREE:
        return (
            f"{settled}; round-trip gain rho = 1: the literal definition holds exactly, and so does any "
            "multiple of these values (defined only up to scale; shown with |m_X| + |m_Y| = 1)"
        )
    if status == Status.MONEY_PUMP:
        kind = (
            "a money pump: every round trip X -> Y -> X returns at least what left"
            if ab > 0
            else "the values rotate with growing size (ab <= -1)"
        )
        return f"{settled}; round-trip gain sqrt|ab| = {radius:.4g} >= 1, {kind}: value diverges"
    if status == Status.DESTRUCTIVE:
        return (
            f"{settled}; each resource destroys the other (a, b < 0): the positive eigenvalue "
            f"rho = {radius:.4g} has an eigenvector with m_X and m_Y of opposite signs, and its mirror image "
            "(both signs flipped) is equally consistent"
        )
    if status == Status.ROTATING:
        return (
            f"{settled}: ab = {ab:.4g} < 0, so M has imaginary eigenvalues and no real exchange rate exists"
        )
    if status == Status.ZERO:
        if definition == Definition.LITERAL:
            return (
                f"{rates}: m = M m has only the solution m = 0 (every value zero, every action tied, "
                "the policy is the tie rule's)"
            )
        return (
            f"{settled}; the round trip X -> Y -> X brings nothing back (ab = 0): the only consistent "
            "exchange values are zero and the planner is indifferent everywhere"
        )
    if status == Status.OSCILLATING:
        return (
            f"the policy cycles with period {cycle} (each policy makes another one look better); "
            f"stopped after {it} iterations; last estimate shown"
        )
    return f"no fixed point within {max_iterations} iterations; last estimate shown"
