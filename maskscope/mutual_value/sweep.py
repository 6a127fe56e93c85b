"""How much the answer depends on choices the definition leaves open: the tie rule and the starting point.

:func:`tie_spread` solves once per tie rule and says whether the plan and the values are the same under all
of them; :func:`fixed_points` solves from both sign choices of the starting marginal values under every tie
rule and lists every distinct fixed point found, pairing mirror images (X and Y exchanged).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskscope.mutual_value.solver import SETTLED, MutualValueResult, Status, solve
from maskscope.mutual_value.space import TIE_RULES, StateSpace

#: Starting marginal values of the fixed-point search: the positive direction and both sign choices.
STARTS: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.5, -0.5), (-0.5, 0.5))
#: The runs of the search: (start, whether m_X > 0 where the sign is open). The symmetric start is run with
#: both sign choices, so that a game symmetric in X and Y gets both mirror images.
SEARCH: tuple[tuple[tuple[float, float], bool], ...] = (
    ((0.5, 0.5), True),
    ((0.5, 0.5), False),
    ((0.5, -0.5), True),
    ((-0.5, 0.5), False),
)
SAME = 1e-7


def sweep_rules(random_orders: int = 3) -> tuple[str, ...]:
    """The tie rules of a sweep: even, first, last, and ``random_orders`` seeded random orders."""
    return (*TIE_RULES, *(f"random:{k}" for k in range(random_orders)))


def _range(values: Iterable[float]) -> float:
    v = list(values)
    if any(not math.isfinite(x) for x in v):
        return math.nan if not all(not math.isfinite(x) for x in v) else 0.0
    return max(v) - min(v)


def _start_value(r: MutualValueResult) -> float:
    return float(r.values_x[0] + r.values_y[0])


@dataclass
class TieSpread:
    """The planner solved under several tie rules, and how far the answers spread."""

    results: dict[str, MutualValueResult]

    @property
    def statuses(self) -> dict[str, str]:
        """Status per tie rule."""
        return {k: r.status.value for k, r in self.results.items()}

    @property
    def plans(self) -> list[dict[int, tuple[str, ...]]]:
        """The distinct on-path plans (chosen actions at each reachable decision state)."""
        out: list[dict[int, tuple[str, ...]]] = []
        for r in self.results.values():
            p = r.plan()
            if p not in out:
                out.append(p)
        return out

    @property
    def spread_x(self) -> float:
        """max - min of m_X over the tie rules (nan when some but not all are undefined)."""
        return _range(r.price_x for r in self.results.values())

    @property
    def spread_y(self) -> float:
        """max - min of m_Y over the tie rules."""
        return _range(r.price_y for r in self.results.values())

    @property
    def spread_value(self) -> float:
        """max - min of V_X + V_Y at the start over the tie rules."""
        return _range(_start_value(r) for r in self.results.values())

    @property
    def robust_values(self) -> bool:
        """Whether every tie rule gives the same status and the same marginal values and start value."""
        scale = 1.0 + max(
            (
                abs(v)
                for r in self.results.values()
                for v in (r.price_x, r.price_y, _start_value(r))
                if math.isfinite(v)
            ),
            default=0.0,
        )
        spreads = (self.spread_x, self.spread_y, self.spread_value)
        return len(set(self.statuses.values())) == 1 and all(s <= 1e-9 * scale for s in spreads)

    @property
    def robust_plan(self) -> bool:
        """Whether every tie rule gives the same plan (one action at each on-path state, the same one)."""
        return len(self.plans) == 1

    @property
    def robust(self) -> bool:
        """Whether neither the plan nor the values depend on the tie rule."""
        return self.robust_values and self.robust_plan

    def summary(self) -> str:
        """One line: robust or not, with the spread."""
        if self.robust:
            return f"robust to the tie rule: all {len(self.results)} rules give the same plan and values"
        statuses = sorted(set(self.statuses.values()))
        finite = [r for r in self.results.values() if math.isfinite(_start_value(r))]
        if not finite:
            spread = "no rule gives finite values"
        elif len(finite) < len(self.results):
            spread = (
                f"{len(self.results) - len(finite)} rule(s) give no finite values; among the others m_X spans "
                f"{_range(r.price_x for r in finite):.4g}, m_Y {_range(r.price_y for r in finite):.4g}, "
                f"V_X+V_Y at the start {_range(_start_value(r) for r in finite):.4g}"
            )
        else:
            spread = (
                f"spread of m_X {self.spread_x:.4g}, of m_Y {self.spread_y:.4g}, "
                f"of V_X+V_Y at the start {self.spread_value:.4g}"
            )
        parts = [
            f"plan {'the same' if self.robust_plan else f'differs ({len(self.plans)} distinct plans)'}",
            f"values {'the same' if self.robust_values else 'differ'}",
            f"status {' / '.join(statuses)}",
            spread,
        ]
        return f"NOT robust to the tie rule ({len(self.results)} rules): " + "; ".join(parts)


def tie_spread(
    space: StateSpace,
    rules: Sequence[str] | None = None,
    done: dict[str, MutualValueResult] | None = None,
    **kwargs: Any,
) -> TieSpread:
    """Solve under each tie rule (default: :func:`sweep_rules`) with the other settings in ``kwargs``;
    results already in ``done`` are reused."""
    results: dict[str, MutualValueResult] = {}
    for rule in rules if rules is not None else sweep_rules():
        results[rule] = (done or {}).get(rule) or solve(space, ties=rule, **kwargs)
    return TieSpread(results)


@dataclass
class FixedPoint:
    """One distinct fixed point: its status, marginal values, start values, policy, and how it was found."""

    status: Status
    price_x: float
    price_y: float
    value_x: float
    value_y: float
    policy: np.ndarray
    plan: dict[int, tuple[str, ...]]
    found_by: list[str] = field(default_factory=list)
    mirror: int | None = None

    def same_as(self, other: FixedPoint) -> bool:
        """Whether two fixed points agree in status, marginal values and policy."""
        return (
            self.status == other.status
            and _close(self.price_x, other.price_x)
            and _close(self.price_y, other.price_y)
            and np.allclose(self.policy, other.policy, atol=1e-9, rtol=0)
        )


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= SAME * (1.0 + abs(a) + abs(b))


@dataclass
class FixedPointSearch:
    """Every distinct fixed point found, and the runs that did not settle."""

    points: list[FixedPoint]
    unsettled: list[str]

    def summary(self) -> str:
        """One line: how many distinct fixed points, their statuses, mirror pairs, unsettled runs."""
        statuses = ", ".join(sorted({p.status.value for p in self.points})) or "none"
        pairs = sum(1 for i, p in enumerate(self.points) if p.mirror is not None and p.mirror > i)
        runs = sum(len(p.found_by) for p in self.points) + len(self.unsettled)
        text = f"{len(self.points)} distinct fixed point(s) in {runs} runs (status {statuses})"
        if pairs:
            text += f"; {pairs} mirror pair(s) (X and Y exchanged)"
        if self.unsettled:
            text += f"; {len(self.unsettled)} run(s) did not settle"
        return text


def fixed_points(
    space: StateSpace,
    rules: Sequence[str] | None = None,
    search: Sequence[tuple[tuple[float, float], bool]] = SEARCH,
    done: dict[tuple[str, tuple[float, float], bool], MutualValueResult] | None = None,
    **kwargs: Any,
) -> FixedPointSearch:
    """Solve from each (start, sign choice) of ``search`` and each tie rule (settings in ``kwargs``) and
    collect the distinct fixed points; results already in ``done`` (keyed by rule, start and sign choice)
    are reused."""
    points: list[FixedPoint] = []
    unsettled: list[str] = []
    for start, x_positive in search:
        for rule in rules if rules is not None else sweep_rules():
            key = (rule, start, x_positive)
            r = (done or {}).get(key) or solve(space, ties=rule, start=start, x_positive=x_positive, **kwargs)
            sign = "m_X" if x_positive else "m_Y"
            label = f"ties {rule}, m0 = ({start[0]:g}, {start[1]:g}), sign choice {sign} > 0"
            if r.status not in SETTLED:
                unsettled.append(f"{label}: {r.status.value}")
                continue
            point = FixedPoint(
                status=r.status,
                price_x=r.price_x,
                price_y=r.price_y,
                value_x=float(r.values_x[0]),
                value_y=float(r.values_y[0]),
                policy=r.policy,
                plan=r.plan(),
                found_by=[label],
            )
            match = next((p for p in points if p.same_as(point)), None)
            if match is None:
                points.append(point)
            else:
                match.found_by.append(label)
    for i, p in enumerate(points):
        if _close(p.price_x, p.price_y) and _close(p.value_x, p.value_y):
            continue
        for j, o in enumerate(points):
            if (
                j != i
                and o.status == p.status
                and _close(p.price_x, o.price_y)
                and _close(p.price_y, o.price_x)
                and _close(p.value_x, o.value_y)
                and _close(p.value_y, o.value_x)
            ):
                p.mirror = j
                break
    return FixedPointSearch(points, unsettled)
