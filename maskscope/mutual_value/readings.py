"""The readings of the mutual-value definition and of per-unit rates, as command-line choices (a light
module: the command line imports it without the solver)."""

from __future__ import annotations

from enum import StrEnum


class Definition(StrEnum):
    """Which reading of the definition is solved."""

    INTRINSIC = "intrinsic"
    EXCHANGE = "exchange"
    LITERAL = "literal"


class PerUnit(StrEnum):
    """How the per-unit rates a, b (and so the marginal values) are measured at the start."""

    MARGINAL = "marginal"
    AVERAGE = "average"
