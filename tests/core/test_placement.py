"""The placement policy: which cards fit a request, and binpack and spread over one fit."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushare.core import placement
from gpushare.core.ids import CardUUID, NodeName
from gpushare.core.placement import Card, Fit, Miss
from gpushare.core.quantities import GI, MI
from tests import strategies

H100 = 80 * GI
L4 = 24 * GI
MPS_SERVER = 66 * MI


def card(
    index: int,
    *,
    capacity: int = H100,
    granted: int = 0,
    free: int | None = None,
    healthy: bool = True,
    node: str = "node-a",
) -> Card:
    return Card(
        node=NodeName(node),
        uuid=CardUUID(f"GPU-{node}-{index}"),
        index=index,
        capacity_bytes=capacity,
        granted_bytes=granted,
        free_bytes=free,
        healthy=healthy,
    )


def _indices(fits: list[Fit]) -> list[int]:
    return [fit.card.index for fit in fits]


# Four H100s holding 0, 24, 48 and 70 GiB of grants.
FOUR = [card(0), card(1, granted=24 * GI), card(2, granted=48 * GI), card(3, granted=70 * GI)]


@pytest.mark.parametrize(
    ("cards", "request_gi", "binpack", "spread"),
    [
        (FOUR, 8, [3, 2, 1, 0], [0, 1, 2, 3]),
        (FOUR, 16, [2, 1, 0], [0, 1, 2]),
        (FOUR, 40, [1, 0], [0, 1]),
        (FOUR, 80, [0], [0]),
        (FOUR, 81, [], []),
        # Mixed sizes: binpack fills the H100 with 20 GiB left, spread picks the emptier L4.
        ([card(0, capacity=L4), card(1, granted=60 * GI)], 16, [1, 0], [0, 1]),
        # Same room left after: binpack prefers the larger card, spread the larger share.
        ([card(0, capacity=L4), card(1, granted=56 * GI)], 8, [1, 0], [0, 1]),
        # Equal cards: node name, then index, break the tie.
        (
            [card(1, node="node-b"), card(0, node="node-b"), card(2, node="node-a")],
            8,
            [2, 0, 1],
            [2, 0, 1],
        ),
        # An unhealthy card never fits, however empty.
        ([card(0, healthy=False), card(1, granted=40 * GI)], 8, [1], [1]),
        # Foreign use (free < capacity - granted) takes room: card 0 has 30 GiB left, not 80.
        ([card(0, free=30 * GI), card(1, granted=40 * GI)], 35, [1], [1]),
    ],
    ids=[
        "packed-vs-distributed-small",
        "one-card-too-full",
        "two-cards-too-full",
        "only-the-empty-card",
        "nothing-fits",
        "mixed-sizes",
        "tie-on-room-after",
        "tie-on-everything",
        "unhealthy-card",
        "foreign-use",
    ],
)
def test_binpack_and_spread_orderings(
    cards: list[Card], request_gi: int, binpack: list[int], spread: list[int]
) -> None:
    fits, _ = placement.split(cards, request_gi * GI)
    assert _indices(placement.order(fits, "binpack")) == binpack
    assert _indices(placement.order(fits, "spread")) == spread
    for policy, expected in (("binpack", binpack), ("spread", spread)):
        best = placement.best(fits, policy)  # type: ignore[arg-type]
        assert (best.card.index if best else None) == (expected[0] if expected else None)


@pytest.mark.parametrize(
    ("policy", "scores"),
    # After 8 GiB the four cards keep 72, 48, 24 and 2 of 80 GiB: 10%, 40%, 70%, 97.5% full.
    [("binpack", [1, 4, 7, 10]), ("spread", [9, 6, 3, 0])],
    ids=["binpack", "spread"],
)
def test_scores_run_from_0_to_10(policy: placement.Policy, scores: list[int]) -> None:
    fits, _ = placement.split(FOUR, 8 * GI)
    assert [placement.score(fit, policy) for fit in fits] == scores


@pytest.mark.parametrize(
    ("target", "request_bytes", "overhead", "reason"),
    [
        (card(0, granted=70 * GI), 12 * GI, 0, "GPU 0 has 10 GiB free"),
        (card(4, granted=60 * GI), 20 * GI, MPS_SERVER, "GPU 4 has 20 GiB free"),
        (card(2, healthy=False), GI, 0, "GPU 2 is unhealthy"),
        (card(1, granted=20 * GI, free=40 * GI), 50 * GI, 0, "GPU 1 has 40 GiB free"),
        (card(3, granted=90 * GI), GI, 0, "GPU 3 has 0 B free"),
    ],
    ids=["too-full", "mps-server-overhead", "unhealthy", "foreign-use", "over-committed"],
)
def test_misses_carry_their_reason(
    target: Card, request_bytes: int, overhead: int, reason: str
) -> None:
    outcome = placement.check(target, request_bytes, overhead_bytes=overhead)
    assert isinstance(outcome, Miss)
    assert outcome.reason == reason


def test_a_fit_costs_the_request_plus_the_overhead() -> None:
    outcome = placement.check(
        card(0, granted=60 * GI), 20 * GI - MPS_SERVER, overhead_bytes=MPS_SERVER
    )
    assert isinstance(outcome, Fit)
    assert outcome.cost_bytes == 20 * GI
    assert outcome.room_after == 0


@pytest.mark.parametrize(
    ("free", "granted", "foreign", "room"),
    [
        (None, 20 * GI, 0, 60 * GI),
        (60 * GI, 20 * GI, 0, 60 * GI),
        (70 * GI, 20 * GI, 0, 60 * GI),  # grants not in use yet: room is still what is ungranted
        (40 * GI, 20 * GI, 20 * GI, 40 * GI),
        (0, 0, 80 * GI, 0),
    ],
    ids=["unknown", "all-accounted", "grants-idle", "foreign-20Gi", "card-full-of-foreign"],
)
def test_foreign_use_reduces_room(free: int | None, granted: int, foreign: int, room: int) -> None:
    target = card(0, granted=granted, free=free)
    assert target.foreign_bytes == foreign
    assert target.room_bytes == room


@pytest.mark.parametrize(
    ("misses", "expected"),
    [
        ([], "node has no gpushare cards"),
        (
            [Miss(card(0, healthy=False), ""), Miss(card(1, healthy=False), "")],
            "all 2 GPUs are unhealthy",
        ),
        (
            [
                Miss(card(0, granted=70 * GI), ""),
                Miss(card(1, healthy=False), ""),
                Miss(card(2, granted=68 * GI), ""),
            ],
            "no card with 20 GiB free: best is GPU 2 with 12 GiB",
        ),
    ],
    ids=["no-cards", "all-unhealthy", "best-healthy-card"],
)
def test_explain_sums_up_a_node(misses: list[Miss], expected: str) -> None:
    assert placement.explain(misses, 20 * GI) == expected


_requests = st.integers(min_value=1, max_value=160 * GI)
_overheads = st.sampled_from((0, MPS_SERVER))


@given(strategies.card_lists(), _requests, _overheads)
def test_split_partitions_the_cards_and_never_over_commits(
    cards: list[Card], request: int, overhead: int
) -> None:
    fits, misses = placement.split(cards, request, overhead_bytes=overhead)
    assert sorted([f.card for f in fits] + [m.card for m in misses], key=id) == sorted(
        cards, key=id
    )
    for fit in fits:
        assert fit.card.healthy
        assert fit.cost_bytes == request + overhead
        assert fit.room_after >= 0
        assert fit.card.granted_bytes + fit.cost_bytes <= fit.card.capacity_bytes
        if fit.card.free_bytes is not None:
            assert fit.cost_bytes <= fit.card.free_bytes
    for miss in misses:
        assert miss.reason.startswith(f"GPU {miss.card.index} ")
        assert not miss.card.healthy or miss.card.room_bytes < request + overhead


@given(strategies.cards())
def test_room_is_the_ungranted_part_bounded_by_free(target: Card) -> None:
    ungranted = target.capacity_bytes - target.granted_bytes
    known_free = ungranted if target.free_bytes is None else target.free_bytes
    assert target.room_bytes == max(0, min(ungranted, known_free))


@given(strategies.card_lists(), _requests, st.sampled_from(placement.POLICIES))
def test_best_is_the_first_of_the_order(
    cards: list[Card], request: int, policy: placement.Policy
) -> None:
    fits, _ = placement.split(cards, request)
    ordered = placement.order(fits, policy)
    assert placement.best(fits, policy) == (ordered[0] if ordered else None)
    assert sorted(ordered, key=id) == sorted(fits, key=id)


@given(strategies.card_lists(), _requests)
def test_binpack_fills_the_fullest_card_and_spread_the_emptiest(
    cards: list[Card], request: int
) -> None:
    fits, _ = placement.split(cards, request)
    packed = [fit.room_after for fit in placement.order(fits, "binpack")]
    assert packed == sorted(packed)
    spread = [fit.room_after / fit.card.capacity_bytes for fit in placement.order(fits, "spread")]
    assert spread == sorted(spread, reverse=True)


@given(strategies.card_lists(), _requests, st.sampled_from(placement.POLICIES))
def test_scores_stay_in_range_and_follow_the_order(
    cards: list[Card], request: int, policy: placement.Policy
) -> None:
    fits, _ = placement.split(cards, request)
    scores = [placement.score(fit, policy) for fit in placement.order(fits, policy)]
    assert all(0 <= s <= placement.MAX_SCORE for s in scores)
    if policy == "spread" or len({fit.card.capacity_bytes for fit in fits}) <= 1:
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("cards", "request_gi", "fill", "binpack"),
    [
        # A card in use with room comes before an empty card, even one it would fill better.
        ([card(0, capacity=L4), card(1, granted=50 * GI)], 12, [1, 0], [0, 1]),
        # Among cards in use, the least share left after; then among empty ones, the same.
        (
            [card(0), card(1, capacity=L4), card(2, granted=40 * GI), card(3, granted=60 * GI)],
            8,
            [3, 2, 1, 0],
            [3, 1, 2, 0],
        ),
        # Nothing in use: the empty card the request fills most, the smallest that fits.
        ([card(0), card(1, capacity=L4)], 20, [1, 0], [1, 0]),
    ],
    ids=["in-use-first", "share-left-within-each", "smallest-empty-card"],
)
def test_fill_opens_a_card_only_when_none_in_use_fits(
    cards: list[Card], request_gi: int, fill: list[int], binpack: list[int]
) -> None:
    fits, _ = placement.split(cards, request_gi * GI)
    assert _indices(placement.order(fits, "fill")) == fill
    assert _indices(placement.order(fits, "binpack")) == binpack


def test_fill_scores_any_card_in_use_above_any_empty_card() -> None:
    # After 8 GiB: 72/80 left on the empty H100 (score 0), 14/24 on the empty L4 (1);
    # the cards in use keep 48/80 (4 + round(0.4 * 6) = 6) and 2/80 (10).
    cards = [card(0), card(1, capacity=L4), card(2, granted=24 * GI), card(3, granted=70 * GI)]
    fits, _ = placement.split(cards, 8 * GI)
    assert [placement.score(fit, "fill") for fit in fits] == [0, 1, 6, 10]
