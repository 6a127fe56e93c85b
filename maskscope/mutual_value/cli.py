"""The ``maskscope mutual-value GAME`` command: values, policy, baseline comparison and a tree picture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from maskscope.errors import UserError
from maskscope.mutual_value.readings import Definition, PerUnit

if TYPE_CHECKING:
    from maskscope.mutual_value.analysis import Analysis

MAX_ROWS = 40
MAX_DIFF_ROWS = 12


def _num(v: float) -> str:
    if not np.isfinite(v):
        return "diverges" if np.isnan(v) else f"{v}"
    return "0" if abs(v) < 1e-12 else f"{v:.4g}"


def _plan_text(an: Analysis, plan: dict[int, tuple[str, ...]], limit: int = 4) -> str:
    items = [f"{an.space.describe(s)}: {'/'.join(acts)}" for s, acts in list(plan.items())[:limit]]
    more = f"; ... ({len(plan)} states)" if len(plan) > limit else ""
    return "; ".join(items) + more


def _ties_table(an: Analysis) -> Table:
    table = Table(title=f"Tie rules: {an.ties.summary()}", title_justify="left")
    for col in ("tie rule", "status", "m_X", "m_Y", "V_X+V_Y at start", "plan (first states on the path)"):
        table.add_column(col, overflow="fold")
    for rule, r in an.ties.results.items():
        table.add_row(
            rule,
            r.status.value,
            _num(r.price_x),
            _num(r.price_y),
            _num(float(r.values_x[0] + r.values_y[0])),
            _plan_text(an, r.plan()),
        )
    return table


def _fixed_points_table(an: Analysis) -> Table:
    search = an.fixed_points
    table = Table(title=f"Fixed points: {search.summary()}", title_justify="left")
    for col in ("#", "status", "m_X", "m_Y", "V_X, V_Y at start", "mirror of", "plan", "found by"):
        table.add_column(col, overflow="fold")
    for i, p in enumerate(search.points):
        table.add_row(
            str(i + 1),
            p.status.value,
            _num(p.price_x),
            _num(p.price_y),
            f"{_num(p.value_x)}, {_num(p.value_y)}",
            "-" if p.mirror is None else f"#{p.mirror + 1}",
            _plan_text(an, p.plan, limit=3),
            f"{p.found_by[0]}" + (f" (+{len(p.found_by) - 1} more)" if len(p.found_by) > 1 else ""),
        )
    return table


def picture_path(out: Path | None, game: Path) -> Path:
    """Where the picture goes: ``out`` (a directory gets ``<game>.png`` inside it, a name without a suffix
    gets ``.png``), or runs/mutual-value/<game>.png; an image format matplotlib cannot write is an error."""
    if out is None:
        return Path("runs") / "mutual-value" / f"{game.stem}.png"
    if out.is_dir():
        return out / f"{game.stem}.png"
    if not out.suffix:
        return out.with_name(out.name + ".png")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise UserError(
            f"--out {out}: cannot write pictures as {out.suffix!r}; use one of "
            + ", ".join(f".{f}" for f in sorted(formats))
        )
    return out


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
    definition: Annotated[
        Definition,
        typer.Option(
            "--definition",
            help="intrinsic: m = u + M m (well posed while the round-trip gain is below 1); exchange: the "
            "only self-consistent X:Y rate sqrt(a/b); literal: m = M m (zero unless the gain is exactly 1).",
        ),
    ] = Definition.INTRINSIC,
    intrinsic_x: Annotated[
        float, typer.Option("--intrinsic-x", help="Intrinsic value u_X of one unit of X (intrinsic reading).")
    ] = 1.0,
    intrinsic_y: Annotated[
        float, typer.Option("--intrinsic-y", help="Intrinsic value u_Y of one unit of Y (intrinsic reading).")
    ] = 1.0,
    per_unit: Annotated[
        PerUnit,
        typer.Option(
            "--per-unit",
            help="marginal: what one unit less (one more at baseline) changes; average: per unit above "
            "baseline.",
        ),
    ] = PerUnit.MARGINAL,
    ties: Annotated[
        str,
        typer.Option("--ties", help="Tie rule of the headline solve: even, first, last or random:SEED."),
    ] = "even",
    random_orders: Annotated[
        int,
        typer.Option(
            "--random-orders", help="Seeded random tie orders in the sweep (besides even, first, last)."
        ),
    ] = 3,
    damping: Annotated[
        float, typer.Option("--damping", help="Weight of each new value estimate in the update, in (0, 1].")
    ] = 0.5,
    max_iterations: Annotated[
        int, typer.Option("--max-iterations", help="Cap on policy/value iterations.")
    ] = 200,
) -> None:
    """Solve GAME with the mutual-value planner, compare it with the boring baselines, and draw the tree."""
    from maskscope.mutual_value.analysis import analyse
    from maskscope.mutual_value.space import check_tie_rule

    if not 0 < damping <= 1:
        raise UserError(f"--damping must be in (0, 1], got {damping:g}")
    if max_iterations < 1:
        raise UserError(f"--max-iterations must be at least 1, got {max_iterations}")
    if not 0 <= random_orders <= 100:
        raise UserError(f"--random-orders must be between 0 and 100, got {random_orders}")
    if not (np.isfinite(intrinsic_x) and np.isfinite(intrinsic_y)):
        raise UserError("--intrinsic-x and --intrinsic-y must be finite numbers")
    check_tie_rule(ties)
    target = picture_path(out, game)
    an = analyse(
        game,
        gamma=gamma,
        definition=definition,
        intrinsic=(intrinsic_x, intrinsic_y),
        per_unit=per_unit,
        ties=ties,
        random_orders=random_orders,
        damping=damping,
        max_iterations=max_iterations,
    )
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
    summary.add_row("definition", f"{r.definition.value} (per unit: {r.per_unit.value}, ties: {r.ties})")
    if r.definition == Definition.INTRINSIC:
        summary.add_row("intrinsic values u_X, u_Y", f"{_num(r.intrinsic[0])}, {_num(r.intrinsic[1])}")
    summary.add_row("status", r.status.value)
    summary.add_row("what happened", r.message)
    summary.add_row("iterations", str(r.iterations))
    summary.add_row("marginal values m_X, m_Y", f"{_num(r.price_x)}, {_num(r.price_y)}")
    summary.add_row(
        "Y per unit X (a), X per unit Y (b)", f"{_num(r.round_trip.y_per_x)}, {_num(r.round_trip.x_per_y)}"
    )
    summary.add_row("round-trip gain sqrt|ab|", _num(r.gain))
    summary.add_row("tie rules", an.ties.summary())
    summary.add_row("fixed points", an.fixed_points.summary())
    console.print(summary)
    console.print(_ties_table(an))
    console.print(_fixed_points_table(an))
    console.print(_values_table(an))
    console.print(_comparison_table(an))
    for comp in an.comparisons:
        console.print(f"- {comp.summary}")
    from maskscope.mutual_value.plot import plot_game

    try:
        written = plot_game(r, target)
    except OSError as err:
        raise UserError(f"cannot write the picture to {target}: {err.strerror or err}") from None
    console.print(f"picture: {written}", soft_wrap=True)
