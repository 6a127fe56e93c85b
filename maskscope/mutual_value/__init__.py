"""Mutual-value planning: the value of X is the value of the Y it brings, and the value of Y is the value of
the X it brings. Games, the fixed-point solver, the boring baselines and the comparison between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maskscope.mutual_value.baselines import (
    BASELINES,
    BaselineResult,
    Comparison,
    Difference,
    compare,
    solve_baseline,
    solve_baselines,
)
from maskscope.mutual_value.model import Game, load_game, parse_game
from maskscope.mutual_value.solver import MutualValueResult, RoundTrip, Status, round_trip, solve
from maskscope.mutual_value.space import StateSpace, build_space


@dataclass
class Analysis:
    """A game solved by the mutual-value planner and the three baselines, with the comparisons."""

    game: Game
    space: StateSpace
    result: MutualValueResult
    baselines: list[BaselineResult]
    comparisons: list[Comparison]


def analyse(
    game: Game | Path | str,
    gamma: float | None = None,
    damping: float = 0.5,
    max_iterations: int = 200,
) -> Analysis:
    """Solve a game (or a game file) with the planner and the baselines, and compare their choices."""
    g = game if isinstance(game, Game) else load_game(game)
    if gamma is not None:
        g = g.with_gamma(gamma)
    space = build_space(g)
    result = solve(space, damping=damping, max_iterations=max_iterations)
    bases = solve_baselines(space)
    return Analysis(g, space, result, bases, [compare(result, b) for b in bases])


__all__ = [
    "BASELINES",
    "Analysis",
    "BaselineResult",
    "Comparison",
    "Difference",
    "Game",
    "MutualValueResult",
    "RoundTrip",
    "StateSpace",
    "Status",
    "analyse",
    "build_space",
    "compare",
    "load_game",
    "parse_game",
    "round_trip",
    "solve",
    "solve_baseline",
    "solve_baselines",
]
