"""The offline optimum packs exactly: fewest cards, most requests placed, optimality reported."""

from hypothesis import given, settings
from hypothesis import strategies as st

from gpushare.core.quantities import GI
from gpushare.simulator import optimum


def _items(*sizes: int) -> list[optimum.Item]:
    return [optimum.Item(f"s{i}", size * GI) for i, size in enumerate(sizes)]


def _bins(count: int, size: int, group: str = "H100") -> list[optimum.Bin]:
    return [optimum.Bin(f"{group}/{i}", group, size * GI) for i in range(count)]


def test_a_perfect_packing_is_found_and_proven() -> None:
    packing = optimum.solve(_items(60, 40, 30, 30, 20, 20), _bins(4, 100))
    assert packing.status == "optimal"
    assert packing.cards_used == 2
    assert packing.cards_bound == 2
    assert packing.placed == 6


def test_first_fit_decreasing_is_beaten_where_it_loses() -> None:
    # FFD puts 50+40 together, then 30+30+30 and 20+... : 3 cards; the optimum is 50+30+20 twice.
    packing = optimum.solve(_items(50, 50, 30, 30, 20, 20), _bins(4, 100))
    assert packing.cards_used == 2


def test_no_card_holds_more_than_its_capacity() -> None:
    items = _items(33, 33, 33, 34, 50, 17, 66, 12, 70, 8)
    bins = _bins(3, 100) + _bins(3, 24, group="L4")
    packing = optimum.solve(items, bins)
    load: dict[str, int] = {}
    sizes = {item.name: item.cost_bytes for item in items}
    for item, card in packing.assignment.items():
        load[card] = load.get(card, 0) + sizes[item]
    capacity = {b.name: b.capacity_bytes for b in bins}
    assert all(load[card] <= capacity[card] for card in load)
    assert packing.placed == len(packing.assignment) >= 9


def test_requests_that_fit_nowhere_are_left_out_not_failed() -> None:
    packing = optimum.solve(_items(90, 10, 10), _bins(2, 80))
    assert packing.status == "optimal"
    assert packing.placed == 2
    assert packing.cards_used == 1
    assert "s0" not in packing.assignment


def test_the_cost_of_cards_decides_before_their_number() -> None:
    # Three 20s: one 80 GiB card (cost 80) or three 24 GiB cards (cost 72).
    items = _items(20, 20, 20)
    bins = [optimum.Bin(f"H100/{i}", "H100", 80 * GI, 80.0) for i in range(2)] + [
        optimum.Bin(f"L4/{i}", "L4", 24 * GI, 24.0) for i in range(3)
    ]
    packing = optimum.solve(items, bins)
    assert packing.status == "optimal"
    assert (packing.cards_used, packing.cost, packing.cost_bound) == (3, 72.0, 72.0)
    by_count = optimum.solve(items, [optimum.Bin(b.name, b.group, b.capacity_bytes) for b in bins])
    assert (by_count.cards_used, by_count.cost) == (1, 1.0)


def test_nothing_to_place_uses_no_cards() -> None:
    assert optimum.solve([], _bins(2, 80)).cards_used == 0


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=90), min_size=1, max_size=12),
    big=st.integers(min_value=0, max_value=3),
    small=st.integers(min_value=0, max_value=3),
)
def test_packings_never_overfill_a_card_and_place_what_greedy_places(
    sizes: list[int], big: int, small: int
) -> None:
    items = _items(*sizes)
    bins = _bins(big, 80) + _bins(small, 24, group="L4")
    packing = optimum.solve(items, bins, time_limit=5.0)
    load: dict[str, int] = {}
    for item in items:
        card = packing.assignment.get(item.name)
        if card is not None:
            load[card] = load.get(card, 0) + item.cost_bytes
    capacity = {b.name: b.capacity_bytes for b in bins}
    assert all(load[card] <= capacity[card] for card in load)
    assert packing.cards_used == len(load)
    # First fit decreasing is a lower bound on what can be placed.
    room = sorted(capacity.values())
    greedy = 0
    for item in sorted(items, key=lambda i: -i.cost_bytes):
        for position, free in enumerate(room):
            if item.cost_bytes <= free:
                room[position] -= item.cost_bytes
                greedy += 1
                break
    assert packing.placed >= greedy
