"""Mutual-value planning: the value of X is the value of the Y it brings, and the value of Y is the value of
the X it brings. Games, the fixed-point solver under three readings of that definition (intrinsic plus
instrumental value, the default; the exchange rate; the literal one), the tie-rule sweep and fixed-point
search, the boring baselines and the comparison between them."""

from __future__ import annotations

import importlib
from typing import Any

# Public names and the module defining each: imported on first use, so that `maskscope --help` and the other
# commands do not pay for numpy, scipy and the solver.
_WHERE = {
    "BASELINES": "baselines",
    "SETTLED": "solver",
    "STARTS": "sweep",
    "TIE_RULES": "space",
    "Analysis": "analysis",
    "BaselineResult": "baselines",
    "Comparison": "baselines",
    "Definition": "solver",
    "Difference": "baselines",
    "FixedPoint": "sweep",
    "FixedPointSearch": "sweep",
    "Game": "model",
    "MutualValueResult": "solver",
    "PerUnit": "solver",
    "RoundTrip": "solver",
    "StateSpace": "space",
    "Status": "solver",
    "TieSpread": "sweep",
    "analyse": "analysis",
    "build_space": "space",
    "compare": "baselines",
    "fixed_points": "sweep",
    "load_game": "model",
    "parse_game": "model",
    "round_trip": "solver",
    "solve": "solver",
    "solve_baseline": "baselines",
    "solve_baselines": "baselines",
    "sweep_rules": "sweep",
    "tie_spread": "sweep",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"maskscope.mutual_value.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskscope.mutual_value' has no attribute {name!r}")


__all__ = sorted(_WHERE)
