"""A game solved by the planner and the baselines, with the tie-rule sweep and every fixed point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maskscope.mutual_value.baselines import (
    BaselineResult,
    Comparison,
    compare,
    solve_baselines,
)
from maskscope.mutual_value.model import Game, load_game
from maskscope.mutual_value.solver import (
    Definition,
    MutualValueResult,
    PerUnit,
    solve,
)
from maskscope.mutual_value.space import StateSpace, build_space
from maskscope.mutual_value.sweep import (
    STARTS,
    FixedPointSearch,
    TieSpread,
    fixed_points,
    sweep_rules,
    tie_spread,
)


@dataclass
class Analysis:
    """A game solved by the mutual-value planner and the three baselines, with the comparisons, the
    planner under every tie rule of the sweep, and every fixed point found."""

    game: Game
    space: StateSpace
    result: MutualValueResult
    baselines: list[BaselineResult]
    comparisons: list[Comparison]
    ties: TieSpread
    fixed_points: FixedPointSearch


def analyse(
    game: Game | Path | str,
    gamma: float | None = None,
    definition: Definition | str = Definition.INTRINSIC,
    intrinsic: tuple[float, float] = (1.0, 1.0),
    per_unit: PerUnit | str = PerUnit.MARGINAL,
    ties: str = "even",
    random_orders: int = 3,
    damping: float = 0.5,
    max_iterations: int = 200,
) -> Analysis:
    """Solve a game (or a game file) with the planner under tie rule ``ties`` and with the baselines,
    compare their choices, and measure how the answer depends on the tie rule (even, first, last and
    ``random_orders`` seeded random orders) and on the starting point (every fixed point found)."""
    g = game if isinstance(game, Game) else load_game(game)
    if gamma is not None:
        g = g.with_gamma(gamma)
    space = build_space(g)
    settings = {
        "definition": definition,
        "intrinsic": intrinsic,
        "per_unit": per_unit,
        "damping": damping,
        "max_iterations": max_iterations,
    }
    result = solve(space, ties=ties, **settings)  # type: ignore[arg-type]
    rules = list(dict.fromkeys([*sweep_rules(random_orders), result.ties]))
    spread = tie_spread(space, rules, done={result.ties: result}, **settings)
    done = {(rule, STARTS[0], True): r for rule, r in spread.results.items()}
    search = fixed_points(space, rules, done=done, **settings)
    bases = solve_baselines(space)
    return Analysis(g, space, result, bases, [compare(result, b) for b in bases], spread, search)
