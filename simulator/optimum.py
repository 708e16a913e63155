"""The offline optimum: the cheapest cards that hold the same requests, by exact bin packing.

Sizes are divided by their greatest common divisor, so the integer model is exact, not rounded.
The objective is lexicographic: place as many requests as possible, then spend the least on the
cards used (each card weighs its :attr:`Bin.cost`; on a fleet of one model that is the fewest
cards), then use as few cards as possible. CP-SAT solves it. Requests of one size are counted
per card rather than named, and cards of one model fill in order, which takes both symmetries
out of the search: the solver proves optimality in seconds for the built-in trace on a few dozen
cards of one model.
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["optimal", "feasible", "unknown", "infeasible"]

DEFAULT_TIME_LIMIT: Final = 10.0
"""Seconds CP-SAT may search; the answer says whether it proved optimality in that time."""

_COST_SCALE: Final = 1000
"""Costs are rounded to thousandths for the integer model."""
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
    cost: float = 1.0
    """What using the card weighs (the configured cost of its model; 1 counts cards)."""


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
    cost: float | None = None
    """Summed cost of the cards used in the best packing found."""
    cost_bound: float = 0.0
    """A proven lower bound on that cost, for the placed requests."""


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
        return Packing("optimal", 0, 0, 0, {}, 0.0, 0.0, 0.0)
    scale = math.gcd(*(item.cost_bytes for item in items), *(b.capacity_bytes for b in bins))
    scale = max(scale, 1)
    # Requests of one size are interchangeable: count them per card rather than name them, which
    # takes their symmetry out of the search.
    classes: dict[int, list[Item]] = {}
    for item in items:
        classes.setdefault(item.cost_bytes // scale, []).append(item)
    sizes = sorted(classes, reverse=True)
    caps = [b.capacity_bytes // scale for b in bins]

    model = cp_model.CpModel()
    count = {
        (k, j): model.new_int_var(0, min(len(classes[size]), cap // size), f"n{k}_{j}")
        for k, size in enumerate(sizes)
        for j, cap in enumerate(caps)
        if size <= cap
    }
    used = [model.new_bool_var(f"used{j}") for j in range(len(bins))]
    placed = []
    for k, size in enumerate(sizes):
        placed_k = model.new_int_var(0, len(classes[size]), f"placed{k}")
        model.add(sum(count[k, j] for j in range(len(bins)) if (k, j) in count) == placed_k)
        placed.append(placed_k)
    for j, cap in enumerate(caps):
        model.add(sum(sizes[k] * var for (k, jj), var in count.items() if jj == j) <= cap * used[j])
    # Interchangeable cards fill in order: a later card of a group is used only if an earlier is.
    by_group: dict[tuple[str, int], list[int]] = {}
    for j, b in enumerate(bins):
        by_group.setdefault((b.group, caps[j]), []).append(j)
    for group in by_group.values():
        for first, second in itertools.pairwise(group):
            model.add_implication(used[second], used[first])
    # Redundant but strong: the cards used hold at least the bytes placed.
    model.add(
        sum(cap * used[j] for j, cap in enumerate(caps))
        >= sum(size * var for size, var in zip(sizes, placed, strict=True))
    )
    # Lexicographic in one integer objective: each placed request outweighs every card's cost,
    # and each unit of cost (a thousandth) outweighs using every card.
    costs = [max(1, round(b.cost * _COST_SCALE)) for b in bins]
    per_cost = len(bins) + 1
    weight = per_cost * sum(costs) + len(bins) + 1
    model.maximize(
        weight * sum(placed) - sum((per_cost * c + 1) * u for c, u in zip(costs, used, strict=True))
    )

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers
    status = _STATUS.get(solver.status_name(solver.solve(model)), "unknown")
    if status not in ("optimal", "feasible"):
        return Packing(status, None, 0, 0, {}, solver.wall_time)
    n_placed = sum(int(solver.value(var)) for var in placed)
    assignment: dict[str, str] = {}
    for (k, j), var in sorted(count.items()):
        for _ in range(int(solver.value(var))):
            assignment[classes[sizes[k]].pop().name] = bins[j].name
    held = set(assignment.values())
    cards_used = len(held)
    cost = sum(b.cost for b in bins if b.name in held)
    # The objective bound is weight * placed - (per_cost * cost + cards); with placed fixed, it
    # bounds the cost from below (cards add at most len(bins)).
    penalty = math.ceil(weight * n_placed - solver.best_objective_bound)
    least = max(0, math.ceil((penalty - len(bins)) / per_cost))
    cost_bound = min(least / _COST_SCALE, cost)
    if len(set(costs)) == 1:
        cards_bound = -(-least // costs[0])
    else:  # cards of several costs: what the placed bytes fill on the largest cards
        placed_bytes = sum(
            size * int(solver.value(n)) for size, n in zip(sizes, placed, strict=True)
        )
        cards_bound = -(-placed_bytes // max(caps, default=1))
    return Packing(
        status, cards_used, min(cards_bound, cards_used), n_placed, assignment, solver.wall_time,
        cost, cost_bound,
    )
