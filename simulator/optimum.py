"""The offline optimum: the fewest cards that hold the same requests, by exact bin packing (CP-SAT).

Sizes are divided by their greatest common divisor, so the integer model is exact, not rounded.
The objective is lexicographic: place as many requests as possible, then use as few cards as
possible. Cards of one model are interchangeable; an order constraint on their use breaks that
symmetry, which lets the solver prove optimality in seconds for a few hundred cards.
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["optimal", "feasible", "unknown", "infeasible"]

DEFAULT_TIME_LIMIT: Final = 10.0
"""Seconds CP-SAT may search; the answer says whether it proved optimality in that time."""

_STATUS: Final[dict[str, Status]] = {
    "OPTIMAL": "optimal",
    "FEASIBLE": "feasible",
    "INFEASIBLE": "infeasible",
}


@dataclass(frozen=True, slots=True)
class Item:
    """A request to place: its name and the bytes it takes from a card."""

    name: str
    cost_bytes: int


@dataclass(frozen=True, slots=True)
class Bin:
    """A card: its name, a group of interchangeable cards, and the bytes grants may use."""

    name: str
    group: str
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class Packing:
    """The solver's answer."""

    status: Status
    cards_used: int | None
    """Cards holding at least one request in the best packing found."""
    cards_bound: int
    """A proven lower bound on cards used, for the placed requests."""
    placed: int
    """Requests placed (all of them, unless the fleet cannot hold them)."""
    assignment: dict[str, str]
    """Request name → card name."""
    seconds: float


def solve(
    items: Sequence[Item],
    bins: Sequence[Bin],
    *,
    time_limit: float = DEFAULT_TIME_LIMIT,
    workers: int = 2,
) -> Packing:
    """Pack ``items`` into ``bins``: most requests placed, then fewest cards."""
    from ortools.sat.python import cp_model  # noqa: PLC0415 - OR-tools takes a second to load

    if not items:
        return Packing("optimal", 0, 0, 0, {}, 0.0)
    scale = math.gcd(*(item.cost_bytes for item in items), *(b.capacity_bytes for b in bins))
    scale = max(scale, 1)
    sizes = [item.cost_bytes // scale for item in items]
    caps = [b.capacity_bytes // scale for b in bins]

    model = cp_model.CpModel()
    x = {
        (i, j): model.new_bool_var(f"x{i}_{j}")
        for i, size in enumerate(sizes)
        for j, cap in enumerate(caps)
        if size <= cap
    }
    used = [model.new_bool_var(f"used{j}") for j in range(len(bins))]
    placed = []
    for i in range(len(items)):
        options = [x[i, j] for j in range(len(bins)) if (i, j) in x]
        placed_i = model.new_bool_var(f"placed{i}")
        model.add(sum(options) == placed_i)
        placed.append(placed_i)
    for j, cap in enumerate(caps):
        members = [(i, x[i, j]) for i in range(len(items)) if (i, j) in x]
        model.add(sum(sizes[i] * var for i, var in members) <= cap * used[j])
        for _, var in members:
            model.add_implication(var, used[j])
    # Interchangeable cards fill in order: card k+1 of a group is used only if card k is.
    by_group: dict[tuple[str, int], list[int]] = {}
    for j, b in enumerate(bins):
        by_group.setdefault((b.group, caps[j]), []).append(j)
    for group in by_group.values():
        for first, second in itertools.pairwise(group):
            model.add_implication(used[second], used[first])
    # Redundant but strong: the cards used hold at least the bytes placed.
    model.add(sum(cap * used[j] for j, cap in enumerate(caps)) >= sum(
        size * var for size, var in zip(sizes, placed, strict=True)
    ))
    weight = len(bins) + 1
    model.maximize(weight * sum(placed) - sum(used))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers
    status = _STATUS.get(solver.status_name(solver.solve(model)), "unknown")
    if status not in ("optimal", "feasible"):
        return Packing(status, None, 0, 0, {}, solver.wall_time)
    n_placed = sum(int(solver.value(var)) for var in placed)
    assignment = {
        items[i].name: bins[j].name for (i, j), var in x.items() if solver.value(var)
    }
    cards_used = sum(int(solver.value(var)) for var in used)
    # The objective bound is weight * placed - cards; with placed fixed, it bounds cards from below.
    bound = math.ceil(weight * n_placed - solver.best_objective_bound)
    return Packing(
        status, cards_used, max(0, min(bound, cards_used)), n_placed, assignment, solver.wall_time
    )
