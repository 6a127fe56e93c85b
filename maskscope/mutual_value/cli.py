"""The ``maskscope mutual-value GAME`` command: values, policy, baseline comparison and a tree picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from maskscope.errors import UserError
from maskscope.mutual_value import Analysis, analyse

MAX_ROWS = 40
MAX_DIFF_ROWS = 12


def _num(v: float) -> str:
    return "0" if abs(v) < 1e-12 else f"{v:.4g}"


def _values_table(an: Analysis) -> Table:
    space, r = an.space, an.result
    table = Table(title="Values and policy (states the planner can reach)", title_justify="left")
    for col in ("state", "kind", "V_X", "V_Y", "V_X+V_Y", "planner takes", "V_X+V_Y after each action"):
        table.add_column(col, overflow="fold")
    states = np.flatnonzero(space.reachable(r.policy))
    for s in states[:MAX_ROWS]:
        s = int(s)
        kind = space.game.kinds[int(space.node[s])]
        alternatives = ""
        chosen = ""
        if kind == "decision":
            alternatives = ", ".join(f"{space.choice_label[c]}: {_num(r.q[c])}" for c in space.choices(s))
            names = r.chosen(s)
            chosen = "any (indifferent)" if len(names) == len(space.choices(s)) > 1 else " / ".join(names)
        table.add_row(
            space.describe(s),
            kind,
            _num(r.values_x[s]),
            _num(r.values_y[s]),
            _num(r.values_x[s] + r.values_y[s]),
            chosen,
            alternatives,
        )
    if len(states) > MAX_ROWS:
        table.caption = f"first {MAX_ROWS} of {len(states)} states"
    return table


def _comparison_table(an: Analysis) -> Table:
    space = an.space
    table = Table(title="Where the planner and the baselines choose differently", title_justify="left")
    for col in ("baseline", "state", "planner", "baseline takes", "why"):
        table.add_column(col, overflow="fold")
    for comp in an.comparisons:
        if not comp.differences:
            table.add_row(f"max {comp.baseline}", "-", "-", "-", comp.summary)
            continue
        for d in comp.differences[:MAX_DIFF_ROWS]:
            table.add_row(
                f"max {comp.baseline}",
                space.describe(d.state),
                " / ".join(d.planner),
                " / ".join(d.baseline),
                d.reason,
            )
        if len(comp.differences) > MAX_DIFF_ROWS:
            table.add_row(
                f"max {comp.baseline}", "...", "", "", f"{comp.summary}; first {MAX_DIFF_ROWS} shown"
            )
    return table


def mutual_value_command(
    game: Annotated[Path, typer.Argument(help="Game file (YAML or JSON).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the tree picture (PNG). Default: runs/mutual-value/<game>.png"
        ),
    ] = None,
    gamma: Annotated[
        float | None, typer.Option("--gamma", help="Discount factor instead of the game's.")
    ] = None,
    damping: Annotated[
        float, typer.Option("--damping", help="Weight of each new value estimate in the update, in (0, 1].")
    ] = 0.5,
    max_iterations: Annotated[
        int, typer.Option("--max-iterations", help="Cap on policy/value iterations.")
    ] = 200,
) -> None:
    """Solve GAME with the mutual-value planner, compare it with the boring baselines, and draw the tree."""
    if not 0 < damping <= 1:
        raise UserError(f"--damping must be in (0, 1], got {damping:g}")
    if max_iterations < 1:
        raise UserError(f"--max-iterations must be at least 1, got {max_iterations}")
    an = analyse(game, gamma=gamma, damping=damping, max_iterations=max_iterations)
    r, g = an.result, an.game
    console = Console()
    console.print(
        f"[bold]{g.name}[/bold] ({g.structure}, gamma={g.gamma:g}, baseline x={g.baseline[0]:g} "
        f"y={g.baseline[1]:g}, {an.space.n_states} states)"
    )
    if g.description:
        console.print(g.description.strip())
    summary = Table(show_header=False, title="Mutual-value solution", title_justify="left")
    summary.add_column("", style="bold")
    summary.add_column("", overflow="fold")
    summary.add_row("status", r.status.value)
    summary.add_row("what happened", r.message)
    summary.add_row("iterations", str(r.iterations))
    summary.add_row("marginal values m_X, m_Y", f"{_num(r.price_x)}, {_num(r.price_y)}")
    summary.add_row(
        "Y per unit X (a), X per unit Y (b)", f"{_num(r.round_trip.y_per_x)}, {_num(r.round_trip.x_per_y)}"
    )
    summary.add_row("round-trip gain rho", _num(r.gain))
    console.print(summary)
    console.print(_values_table(an))
    console.print(_comparison_table(an))
    for comp in an.comparisons:
        console.print(f"- {comp.summary}")
    target = out if out is not None else Path("runs") / "mutual-value" / f"{game.stem}.png"
    from maskscope.mutual_value.plot import plot_game

    try:
        written = plot_game(r, target)
    except OSError as err:
        raise UserError(f"cannot write the picture to {target}: {err.strerror or err}") from None
    console.print(f"picture: {written}")
