"""Games whose states carry amounts of two resources, X and Y: the file format, its validation, and the
compiled form the solver reads.

A game is a finite graph of nodes (decision, chance or terminal). The full state is a node together with
the amounts (x, y) held there. Every action and every chance outcome moves to a node and changes the
amounts by an effect: ``set`` amounts, ``add`` constants, ``convert`` one resource into the other
(consuming it) and ``produce`` one resource from the holding of another (without consuming it). Because
effects can depend on the amounts held, what X is worth depends on what it does later, which is what the
mutual-value definition measures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from maskscope.errors import UserError

Resource = Literal["x", "y"]
RESOURCES: tuple[Resource, Resource] = ("x", "y")


def _a_number(v: Any) -> Any:
    """Numbers only: YAML's yes/no (booleans) and quoted strings are not amounts."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"must be a number, not {type(v).__name__}")
    if isinstance(v, int) and abs(v) > 1e300:
        raise ValueError("must be a finite number of reasonable size")
    return v


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


Number = Annotated[float, BeforeValidator(_a_number), AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PartialAmounts(_Strict):
    """Amounts of X and/or Y; a missing resource is left alone."""

    x: Number | None = None
    y: Number | None = None

    @model_validator(mode="after")
    def _finite(self) -> PartialAmounts:
        for r in RESOURCES:
            v = getattr(self, r)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{r} must be a finite number")
        return self


class Amounts(_Strict):
    """Amounts of X and Y (both default to 0)."""

    x: Number = 0.0
    y: Number = 0.0

    @model_validator(mode="after")
    def _finite(self) -> Amounts:
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError("amounts must be finite numbers")
        return self


class Convert(_Strict):
    """Turn up to ``max`` units (default: all) of ``from`` into ``rate`` units of ``to`` each."""

    source: Resource = Field(alias="from")
    to: Resource
    rate: Number
    max: Number | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Convert:
        if self.source == self.to:
            raise ValueError("convert needs two different resources")
        if not math.isfinite(self.rate):
            raise ValueError("rate must be finite")
        return self


class Produce(_Strict):
    """Add ``rate`` times the holding of ``from`` to ``to`` (the holding of ``from`` is kept)."""

    source: Resource = Field(alias="from")
    to: Resource
    rate: Number

    @field_validator("rate")
    @classmethod
    def _finite_rate(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("rate must be finite")
        return v


def _as_list(v: Any) -> Any:
    if v is None:
        return []
    if isinstance(v, dict):
        return [v]
    return v


class EffectSpec(_Strict):
    """Changes to the amounts, applied in this order: set, add, convert (in order), produce (in order)."""

    to: str
    set: PartialAmounts | None = None
    add: PartialAmounts | None = None
    convert: list[Convert] = Field(default_factory=list)
    produce: list[Produce] = Field(default_factory=list)

    @field_validator("convert", "produce", mode="before")
    @classmethod
    def _single_or_list(cls, v: Any) -> Any:
        return _as_list(v)


class ActionSpec(EffectSpec):
    """A choice at a decision node."""


class OutcomeSpec(EffectSpec):
    """One outcome of a chance node, with its probability."""

    p: Number = Field(gt=0, le=1)
    label: str | None = None


class NodeSpec(_Strict):
    """A node: decision (has actions), chance (has outcomes) or terminal (has neither)."""

    kind: Literal["decision", "chance", "terminal"] | None = None
    label: str | None = None
    actions: dict[str, ActionSpec] | None = None
    outcomes: list[OutcomeSpec] | None = None

    @model_validator(mode="after")
    def _kind(self) -> NodeSpec:
        if self.actions is not None and self.outcomes is not None:
            raise ValueError("a node has either actions or outcomes, not both")
        inferred = (
            "decision" if self.actions is not None else "chance" if self.outcomes is not None else "terminal"
        )
        if self.kind is None:
            self.kind = inferred
        elif self.kind != inferred:
            raise ValueError(f"kind is {self.kind!r} but the node is laid out as a {inferred} node")
        if self.kind == "decision" and not self.actions:
            raise ValueError("a decision node needs at least one action")
        if self.kind == "chance":
            assert self.outcomes is not None
            if not self.outcomes:
                raise ValueError("a chance node needs at least one outcome")
            total = sum(o.p for o in self.outcomes)
            if abs(total - 1.0) > 1e-9:
                raise ValueError(f"outcome probabilities sum to {total:g}, not 1")
        return self


class StartSpec(_Strict):
    """Where play starts and with what amounts."""

    node: str
    x: Number = 0.0
    y: Number = 0.0


class BoundsSpec(_Strict):
    """Optional clamps [low, high] on each resource, applied after every effect."""

    x: tuple[Number, Number] | None = None
    y: tuple[Number, Number] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> BoundsSpec:
        for r in RESOURCES:
            b = getattr(self, r)
            if b is not None and not (math.isfinite(b[0]) and math.isfinite(b[1]) and b[0] <= b[1]):
                raise ValueError(f"bounds for {r} must be finite with low <= high")
        return self


class GameSpec(_Strict):
    """A whole game file."""

    name: str
    description: str = ""
    structure: Literal["tree", "mdp"] = "tree"
    gamma: Number = Field(default=1.0, gt=0, le=1)
    baseline: Amounts = Field(default_factory=Amounts)
    start: StartSpec
    bounds: BoundsSpec = Field(default_factory=BoundsSpec)
    nodes: dict[str, NodeSpec] = Field(min_length=1)


# ----------------------------------------------------------------------------------------------------------
# Compiled form


@dataclass(frozen=True)
class Effect:
    """A compiled effect: maps amounts (x, y) to new amounts."""

    set_x: float | None
    set_y: float | None
    add_x: float
    add_y: float
    converts: tuple[tuple[int, int, float, float | None], ...]
    produces: tuple[tuple[int, int, float], ...]
    bounds: tuple[tuple[float, float] | None, tuple[float, float] | None]

    def apply(self, x: float, y: float) -> tuple[float, float]:
        """The amounts after this effect, starting from (x, y)."""
        v = [x, y]
        if self.set_x is not None:
            v[0] = self.set_x
        if self.set_y is not None:
            v[1] = self.set_y
        v[0] += self.add_x
        v[1] += self.add_y
        for src, dst, rate, cap in self.converts:
            moved = max(0.0, v[src] if cap is None else min(v[src], cap))
            v[src] -= moved
            v[dst] += rate * moved
        for src, dst, rate in self.produces:
            v[dst] += rate * v[src]
        return clamp(v[0], v[1], self.bounds)

    @property
    def constant(self) -> bool:
        """True when the change in amounts does not depend on the amounts held."""
        return self.set_x is None and self.set_y is None and not self.converts and not self.produces


def clamp(
    x: float, y: float, bounds: tuple[tuple[float, float] | None, tuple[float, float] | None]
) -> tuple[float, float]:
    """Clamp (x, y) into the bounds (None: unbounded)."""
    bx, by = bounds
    if bx is not None:
        x = min(max(x, bx[0]), bx[1])
    if by is not None:
        y = min(max(y, by[0]), by[1])
    return x, y


@dataclass(frozen=True)
class Edge:
    """A move to node ``target`` with probability ``p`` (1 for an action) and an effect."""

    label: str
    target: int
    p: float
    effect: Effect


@dataclass(frozen=True)
class Game:
    """A validated game: nodes by index, their kinds and their outgoing moves."""

    name: str
    description: str
    structure: str
    gamma: float
    baseline: tuple[float, float]
    start_node: int
    start: tuple[float, float]
    bounds: tuple[tuple[float, float] | None, tuple[float, float] | None]
    node_names: tuple[str, ...]
    kinds: tuple[str, ...]
    moves: tuple[tuple[Edge, ...], ...]
    cyclic: bool
    source: str = "<game>"

    def node_index(self, name: str) -> int:
        """Index of the node called ``name``."""
        return self.node_names.index(name)

    def with_gamma(self, gamma: float) -> Game:
        """The same game with another discount factor (checked like the file's own)."""
        _check_gamma(gamma, self.cyclic, self.source)
        from dataclasses import replace

        return replace(self, gamma=gamma)

    def swapped(self) -> Game:
        """The same game with the names X and Y exchanged."""
        from dataclasses import replace

        def sw(e: Effect) -> Effect:
            return Effect(
                set_x=e.set_y,
                set_y=e.set_x,
                add_x=e.add_y,
                add_y=e.add_x,
                converts=tuple((1 - s, 1 - d, r, c) for s, d, r, c in e.converts),
                produces=tuple((1 - s, 1 - d, r) for s, d, r in e.produces),
                bounds=(e.bounds[1], e.bounds[0]),
            )

        moves = tuple(tuple(Edge(m.label, m.target, m.p, sw(m.effect)) for m in ms) for ms in self.moves)
        return replace(
            self,
            baseline=(self.baseline[1], self.baseline[0]),
            start=(self.start[1], self.start[0]),
            bounds=(self.bounds[1], self.bounds[0]),
            moves=moves,
        )


def _check_gamma(gamma: float, cyclic: bool, source: str) -> None:
    if not (math.isfinite(gamma) and 0 < gamma <= 1):
        raise UserError(f"{source}: gamma must be in (0, 1], got {gamma:g}")
    if cyclic and gamma >= 1:
        raise UserError(f"{source}: the nodes form a cycle, so gamma must be below 1 (got {gamma:g})")


def _find_cycle(names: list[str], succ: list[list[int]]) -> list[str] | None:
    """A cycle in the node graph as a list of names (first repeated at the end), or None."""
    color = [0] * len(names)  # 0 new, 1 on stack, 2 done
    parent = [-1] * len(names)
    for root in range(len(names)):
        if color[root]:
            continue
        stack: list[tuple[int, int]] = [(root, 0)]
        color[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(succ[node]):
                stack[-1] = (node, i + 1)
                nxt = succ[node][i]
                if color[nxt] == 0:
                    color[nxt] = 1
                    parent[nxt] = node
                    stack.append((nxt, 0))
                elif color[nxt] == 1:
                    path = [nxt]
                    cur = node
                    while cur != nxt:
                        path.append(cur)
                        cur = parent[cur]
                    path.append(nxt)
                    return [names[k] for k in reversed(path)]
            else:
                color[node] = 2
                stack.pop()
    return None


def _compile_effect(spec: EffectSpec, bounds: tuple[Any, Any]) -> Effect:
    idx = {"x": 0, "y": 1}
    return Effect(
        set_x=spec.set.x if spec.set else None,
        set_y=spec.set.y if spec.set else None,
        add_x=(spec.add.x or 0.0) if spec.add else 0.0,
        add_y=(spec.add.y or 0.0) if spec.add else 0.0,
        converts=tuple((idx[c.source], idx[c.to], c.rate, c.max) for c in spec.convert),
        produces=tuple((idx[p.source], idx[p.to], p.rate) for p in spec.produce),
        bounds=bounds,
    )


def compile_game(spec: GameSpec, source: str = "<game>") -> Game:
    """Check references and structure, and turn a parsed file into a :class:`Game`."""
    names = list(spec.nodes)
    index = {n: i for i, n in enumerate(names)}
    if spec.start.node not in index:
        raise UserError(f"{source}: start.node: unknown node {spec.start.node!r}")
    for r, v in zip(RESOURCES, (spec.start.x, spec.start.y), strict=True):
        if not math.isfinite(v):
            raise UserError(f"{source}: start.{r} must be a finite number")
    bounds = (spec.bounds.x, spec.bounds.y)
    start = clamp(spec.start.x, spec.start.y, bounds)
    if start != (spec.start.x, spec.start.y):
        raise UserError(
            f"{source}: start amounts ({spec.start.x:g}, {spec.start.y:g}) lie outside the bounds"
        )
    moves: list[tuple[Edge, ...]] = []
    succ: list[list[int]] = []
    for name, node in spec.nodes.items():
        edges: list[Edge] = []
        if node.kind == "decision":
            assert node.actions is not None
            items: list[tuple[str, EffectSpec, float, str]] = [
                (f"nodes.{name}.actions.{a}", act, 1.0, a) for a, act in node.actions.items()
            ]
        elif node.kind == "chance":
            assert node.outcomes is not None
            items = [
                (f"nodes.{name}.outcomes[{k}]", o, o.p, o.label or f"p={o.p:g}")
                for k, o in enumerate(node.outcomes)
            ]
        else:
            items = []
        for where, eff, p, label in items:
            if eff.to not in index:
                raise UserError(f"{source}: {where}.to: unknown node {eff.to!r}")
            edges.append(Edge(label=label, target=index[eff.to], p=p, effect=_compile_effect(eff, bounds)))
        moves.append(tuple(edges))
        succ.append([e.target for e in edges])
    cycle = _find_cycle(names, succ)
    if cycle is not None and spec.structure == "tree":
        raise UserError(
            f"{source}: declared structure 'tree' but the nodes form a cycle: {' -> '.join(cycle)}"
            " (use structure: mdp for games with cycles)"
        )
    _check_gamma(spec.gamma, cycle is not None, source)
    return Game(
        name=spec.name,
        description=spec.description,
        structure=spec.structure,
        gamma=spec.gamma,
        baseline=(spec.baseline.x, spec.baseline.y),
        start_node=index[spec.start.node],
        start=start,
        bounds=bounds,
        node_names=tuple(names),
        kinds=tuple(str(n.kind) for n in spec.nodes.values()),
        moves=tuple(moves),
        cyclic=cycle is not None,
        source=source,
    )


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}"


def parse_game(data: Any, source: str = "<game>") -> Game:
    """Validate a game given as plain data (as read from YAML/JSON) and compile it."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a game file must hold a mapping at the top level")
    try:
        spec = GameSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(f"{source}: {_format_validation_error(err)}")) from None
    try:
        return compile_game(spec, source)
    except UserError as err:
        raise UserError(_one_line(str(err))) from None


def _one_line(message: str) -> str:
    """The message with line breaks and other control characters shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def load_game(path: Path | str) -> Game:
    """Read a game from a YAML or JSON file (by suffix; anything else is read as YAML)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise UserError(f"{source}: no such game file")
    if not path.is_file():
        raise UserError(f"{source}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{source}: cannot read the game file ({err.__class__.__name__})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{source}: bad JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or "cannot parse"
            raise UserError(f"{source}: bad YAML{where}: {problem}") from None
    return parse_game(data, source)
