"""The finite set of full states (node, x, y) a game can reach, with its moves as sparse arrays.

Besides the states reachable from the start, the space holds every counterfactual the mutual-value
definition asks about: for each state, the same node with X reset to its baseline and with Y reset to its
baseline (and everything reachable from those), plus the start with one unit above baseline of a resource
that starts at its baseline, and the start with one unit less (or, where that is below the baseline or
outside the bounds, one unit more) of each resource: the one-unit counterfactuals of the marginal values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from maskscope.errors import UserError
from maskscope.mutual_value.model import Game, clamp

DEFAULT_MAX_STATES = 20_000
TIE_TOL = 1e-9
TIE_RULES = ("even", "first", "last")


def check_tie_rule(rule: str) -> str:
    """``rule`` if it names a tie rule: even, first, last or random:SEED (SEED a whole number >= 0)."""
    if rule in TIE_RULES:
        return rule
    head, _, seed = rule.partition(":")
    if head == "random" and seed.isdigit():
        return rule
    raise UserError(f"unknown tie rule {rule!r}: use even, first, last or random:SEED (e.g. random:0)")


def _key(node: int, x: float, y: float) -> tuple[int, float, float]:
    return (node, round(x, 9) + 0.0, round(y, 9) + 0.0)


@dataclass
class StateSpace:
    """Full states and their moves.

    States are numbered 0..n-1; state 0 is the start. Each decision state owns one *choice* per action,
    each chance state owns one choice (the chance move); terminal states own none. Choices of a state are
    contiguous: ``choice_ptr[s]:choice_ptr[s + 1]``. Each choice has one or more edges. ``unit_x`` is the
    start, or the start with one unit above baseline of X if X starts at its baseline (the average per unit);
    ``step_x`` is a pair of states (more, less) at the start node one unit of X apart, the start being one of
    them (the one-unit counterfactual), or (-1, -1) if the bounds allow neither; likewise for Y.
    """

    game: Game
    node: np.ndarray
    x: np.ndarray
    y: np.ndarray
    choice_ptr: np.ndarray
    choice_state: np.ndarray
    choice_label: list[str]
    edge_choice: np.ndarray
    edge_dst: np.ndarray
    edge_p: np.ndarray
    edge_dx: np.ndarray
    edge_dy: np.ndarray
    cf_x: np.ndarray
    cf_y: np.ndarray
    unit_x: int
    unit_y: int
    step_x: tuple[int, int]
    step_y: tuple[int, int]

    @property
    def n_states(self) -> int:
        """Number of full states."""
        return len(self.node)

    @property
    def n_choices(self) -> int:
        """Number of choices over all states."""
        return len(self.choice_state)

    def is_decision(self, s: int) -> bool:
        """Whether state ``s`` sits at a decision node."""
        return self.game.kinds[int(self.node[s])] == "decision"

    def decision_mask(self) -> np.ndarray:
        """Boolean mask over choices: True for choices of decision states."""
        kinds = np.array([k == "decision" for k in self.game.kinds])
        return kinds[self.node[self.choice_state]]

    def describe(self, s: int) -> str:
        """A short name for state ``s``: node (x, y)."""
        return f"{self.game.node_names[int(self.node[s])]} (x={self.x[s]:g}, y={self.y[s]:g})"

    def choices(self, s: int) -> range:
        """The choice indices owned by state ``s``."""
        return range(int(self.choice_ptr[s]), int(self.choice_ptr[s + 1]))

    def uniform_policy(self) -> np.ndarray:
        """Weights over choices that split every decision evenly (the indifferent policy)."""
        counts = np.diff(self.choice_ptr)
        return 1.0 / counts[self.choice_state]

    def transition(self, w: np.ndarray) -> sp.csr_matrix:
        """The state-to-state transition matrix under choice weights ``w``."""
        n = self.n_states
        data = w[self.edge_choice] * self.edge_p
        src = self.choice_state[self.edge_choice]
        return sp.csr_matrix((data, (src, self.edge_dst)), shape=(n, n))

    def expected_edge_sum(self, w: np.ndarray, per_edge: np.ndarray) -> np.ndarray:
        """For each state, the expected value of a per-edge quantity over its next move under ``w``."""
        data = w[self.edge_choice] * self.edge_p * per_edge
        return np.bincount(self.choice_state[self.edge_choice], weights=data, minlength=self.n_states)

    def discounted_gains(self, w: np.ndarray, gamma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """G_X, G_Y: expected discounted future increments of X and Y from each state under ``w``."""
        g = self.game.gamma if gamma is None else gamma
        a = (sp.identity(self.n_states, format="csc") - g * self.transition(w)).tocsc()
        rhs = np.column_stack(
            [self.expected_edge_sum(w, self.edge_dx), self.expected_edge_sum(w, self.edge_dy)]
        )
        sol = spla.splu(a).solve(rhs)
        return sol[:, 0], sol[:, 1]

    def evaluate(self, w: np.ndarray, reward: np.ndarray, gamma: float | None = None) -> np.ndarray:
        """Expected discounted sum of a per-edge reward from each state under ``w``."""
        g = self.game.gamma if gamma is None else gamma
        a = (sp.identity(self.n_states, format="csc") - g * self.transition(w)).tocsc()
        return spla.splu(a).solve(self.expected_edge_sum(w, reward))

    def choice_expectation(self, per_edge: np.ndarray) -> np.ndarray:
        """For each choice, the probability-weighted sum of a per-edge quantity over its edges."""
        return np.bincount(self.edge_choice, weights=self.edge_p * per_edge, minlength=self.n_choices)

    def _per_state_max(self, v: np.ndarray) -> np.ndarray:
        starts = self.choice_ptr[:-1]
        has = np.diff(self.choice_ptr) > 0
        best = np.full(self.n_states, -np.inf)
        best[has] = np.maximum.reduceat(v, starts[has])
        return best[self.choice_state]

    def tie_priority(self, ties: str) -> np.ndarray | None:
        """Per choice, the priority a tie rule gives it among tied choices (None: split evenly)."""
        rule = check_tie_rule(ties)
        if rule == "even":
            return None
        if rule == "first":
            return -np.arange(self.n_choices, dtype=float)
        if rule == "last":
            return np.arange(self.n_choices, dtype=float)
        seed = int(rule.partition(":")[2])
        return np.random.default_rng(seed).permutation(self.n_choices).astype(float)

    def greedy(self, q: np.ndarray, tol: float = TIE_TOL, ties: str = "even") -> np.ndarray:
        """Weights on each state's best choices by ``q`` (ties within tol, relative): split evenly among
        them (``ties="even"``), or all on the first, the last, or a seeded random one of them."""
        top = self._per_state_max(q)
        chosen = q >= top - tol * (1.0 + np.abs(top))
        priority = self.tie_priority(ties)
        if priority is not None:
            ranked = np.where(chosen, priority, -np.inf)
            chosen = chosen & (ranked == self._per_state_max(ranked))
        counts = np.bincount(self.choice_state, weights=chosen.astype(float), minlength=self.n_states)
        return chosen / counts[self.choice_state]

    def indifferent_policy(self, ties: str = "even") -> np.ndarray:
        """The policy of a planner to whom every action is worth the same, under a tie rule."""
        return self.greedy(np.zeros(self.n_choices), ties=ties)

    def reachable(self, w: np.ndarray | None = None, start: int = 0) -> np.ndarray:
        """States reachable from ``start`` moving only along choices with positive weight (all if None)."""
        weight = np.ones(self.n_choices) if w is None else w
        live = weight[self.edge_choice] * self.edge_p > 0
        src = self.choice_state[self.edge_choice][live]
        dst = self.edge_dst[live]
        adj = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=(self.n_states, self.n_states))
        seen = np.zeros(self.n_states, dtype=bool)
        seen[start] = True
        frontier = [start]
        while frontier:
            nxt = np.unique(adj[frontier].indices)
            nxt = nxt[~seen[nxt]]
            seen[nxt] = True
            frontier = nxt.tolist()
        return seen


def build_space(game: Game, max_states: int = DEFAULT_MAX_STATES) -> StateSpace:
    """Enumerate the full states of ``game`` (see the module docstring); at most ``max_states`` of them."""
    bx, by = game.baseline
    index: dict[tuple[int, float, float], int] = {}
    nodes: list[int] = []
    xs: list[float] = []
    ys: list[float] = []

    def get(node: int, x: float, y: float) -> int:
        if not (math.isfinite(x) and math.isfinite(y) and abs(x) < 1e15 and abs(y) < 1e15):
            raise UserError(f"{game.source}: amounts grow beyond 1e15 at node {game.node_names[node]!r}")
        k = _key(node, x, y)
        i = index.get(k)
        if i is None:
            if len(nodes) >= max_states:
                raise UserError(
                    f"{game.source}: the game reaches more than {max_states} states (node, x, y); "
                    "declare bounds or use whole-number amounts and rates"
                )
            i = len(nodes)
            index[k] = i
            nodes.append(k[0])
            xs.append(k[1])
            ys.append(k[2])
        return i

    start = get(game.start_node, *game.start)
    x0, y0 = game.start
    unit_x = get(game.start_node, bx + 1.0, y0) if abs(x0 - bx) < 1e-9 else start
    unit_y = get(game.start_node, x0, by + 1.0) if abs(y0 - by) < 1e-9 else start

    def one_unit(resource: int) -> tuple[int, int]:
        held, base = game.start[resource], game.baseline[resource]
        for delta in (-1.0, 1.0):
            moved = [x0, y0]
            moved[resource] += delta
            if held + delta < base - 1e-9 or clamp(moved[0], moved[1], game.bounds) != tuple(moved):
                continue
            other = get(game.start_node, moved[0], moved[1])
            return (start, other) if delta < 0 else (other, start)
        return (-1, -1)  # the bounds leave no room for one unit more or less

    step_x = one_unit(0)
    step_y = one_unit(1)

    choice_ptr = [0]
    choice_state: list[int] = []
    choice_label: list[str] = []
    e_choice: list[int] = []
    e_dst: list[int] = []
    e_p: list[float] = []
    e_dx: list[float] = []
    e_dy: list[float] = []
    cf_x: list[int] = []
    cf_y: list[int] = []
    done = 0
    while done < len(nodes):
        s = done
        n, x, y = nodes[s], xs[s], ys[s]
        kind = game.kinds[n]
        moves = game.moves[n]
        if kind == "decision":
            groups = [[m] for m in moves]
            labels = [m.label for m in moves]
        elif kind == "chance":
            groups = [list(moves)]
            labels = ["chance"]
        else:
            groups, labels = [], []
        for label, group in zip(labels, groups, strict=True):
            c = len(choice_state)
            choice_state.append(s)
            choice_label.append(label)
            for m in group:
                nx, ny = m.effect.apply(x, y)
                d = get(m.target, nx, ny)
                e_choice.append(c)
                e_dst.append(d)
                e_p.append(m.p)
                e_dx.append(xs[d] - x)
                e_dy.append(ys[d] - y)
        choice_ptr.append(len(choice_state))
        cf_x.append(get(n, bx, y))
        cf_y.append(get(n, x, by))
        done += 1

    def arr(v: list[float] | list[int], dtype: type) -> np.ndarray:
        return np.asarray(v, dtype=dtype)

    return StateSpace(
        game=game,
        node=arr(nodes, np.int64),
        x=arr(xs, float),
        y=arr(ys, float),
        choice_ptr=arr(choice_ptr, np.int64),
        choice_state=arr(choice_state, np.int64),
        choice_label=choice_label,
        edge_choice=arr(e_choice, np.int64),
        edge_dst=arr(e_dst, np.int64),
        edge_p=arr(e_p, float),
        edge_dx=arr(e_dx, float),
        edge_dy=arr(e_dy, float),
        cf_x=arr(cf_x, np.int64),
        cf_y=arr(cf_y, np.int64),
        unit_x=unit_x,
        unit_y=unit_y,
        step_x=step_x,
        step_y=step_y,
    )
