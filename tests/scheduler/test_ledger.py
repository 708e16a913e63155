"""The ledger: what fits where, reservations, releases, and the API's truth after a restart."""

import contextlib
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpushare.core import config, errors, nodereport, placement
from gpushare.core.ids import CardUUID, NodeName
from gpushare.scheduler import ledger
from tests import strategies
from tests.scheduler.objects import GI, MI, NOW, OVERHEAD, card, new_ledger, report, request

N1 = NodeName("n1")
N2 = NodeName("n2")


def test_a_reservation_takes_the_grant_plus_the_mps_overhead() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1))
    grant = book.reserve(request(20), N1, policy="binpack")
    assert [(a.card, a.index, a.granted_bytes) for a in grant.allocations] == [
        (CardUUID("GPU-n1-0"), 0, 20 * GI)
    ]
    assert book.card_usage()[(N1, CardUUID("GPU-n1-0"))] == (20 * GI + OVERHEAD, 80 * GI)


@pytest.mark.parametrize(
    ("isolation", "overhead"),
    [("mps", 66 * MI), ("mps-shared", 0), ("none", 0)],
    ids=["mps-daemon-per-allocation", "shared-daemon", "no-isolation"],
)
def test_the_overhead_follows_the_isolation_mode(isolation: str, overhead: int) -> None:
    assert config.validate({"isolation": isolation}).allocation_overhead_bytes == overhead


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [("binpack", 1), ("spread", 0)],
    ids=["binpack-takes-the-fullest-card", "spread-takes-the-emptiest"],
)
def test_policies_choose_cards(policy: str, chosen: int) -> None:
    book = new_ledger(overhead=0)
    book.set_node(N1, report("n1", 2))
    book.reserve(request(40, uid="first"), N1, policy="binpack")  # card 0 of two empty ones
    book.release("first")
    book.reserve(request(40, uid="held"), N1, policy="binpack")
    held = book.grant("held")
    assert held is not None
    # Card of "held" is now the fuller one.
    fuller = held.allocations[0].index
    grant = book.reserve(request(10), N1, policy=policy)  # type: ignore[arg-type]
    expected = fuller if chosen == 1 else 1 - fuller
    assert grant.allocations[0].index == expected


def test_a_node_without_room_says_which_card_comes_closest() -> None:
    book = new_ledger(overhead=0)
    book.set_node(N1, report("n1", 2, total=24 * GI))
    book.reserve(request(20, uid="a"), N1, policy="binpack")
    book.reserve(request(12, uid="b"), N1, policy="binpack")
    failure = book.check(N1, request(16), policy="binpack")
    assert failure is not None
    assert failure.reason == "no-room"
    assert failure.message == "no card with 16 GiB free: best is GPU 1 with 12 GiB"
    with pytest.raises(errors.NoFit, match="best is GPU 1 with 12 GiB"):
        book.reserve(request(16), N1, policy="binpack")


def test_filter_splits_nodes_and_gives_each_failure_a_reason() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1, total=24 * GI))
    book.set_node(N2, report("n2", 1))
    book.set_node(NodeName("silent"), report("silent", 1, heartbeat=NOW - timedelta(hours=1)))
    book.set_node(
        NodeName("sick"),
        nodereport.NodeReport(
            heartbeat=NOW, cards=(card(0, healthy=False), card(1, healthy=False))
        ),
    )
    book.set_node(NodeName("bare"), None)
    passed, failed = book.split(
        ["n1", "n2", "silent", "sick", "bare", "ghost"], request(30), policy="binpack"
    )
    assert passed.names == ["n2"]
    assert {name: f.reason.value for name, f in failed.items()} == {
        "n1": "no-room",
        "silent": "stale-heartbeat",
        "sick": "unhealthy",
        "bare": "no-report",
        "ghost": "unknown-node",
    }
    assert failed["sick"].message == "all 2 GPUs are unhealthy"
    assert failed["silent"].message.startswith("GPU agent silent")


def test_the_agents_free_memory_vetoes_a_card_used_outside_the_ledger() -> None:
    book = new_ledger(overhead=0)
    busy = card(0, used=70 * GI, node="n1")  # someone uses 70 GiB without a grant
    book.set_node(N1, nodereport.NodeReport(heartbeat=NOW, cards=(busy,)))
    assert book.check(N1, request(20), policy="binpack") is not None
    assert book.check(N1, request(10), policy="binpack") is None


def test_capacity_is_the_cuda_visible_total() -> None:
    book = new_ledger(overhead=0)
    reserved = card(0, total=80 * GI, reserved=GI, node="n1")
    book.set_node(N1, nodereport.NodeReport(heartbeat=NOW, cards=(reserved,)))
    assert book.check(N1, request(79), policy="binpack") is None
    assert book.check(N1, request(80), policy="binpack") is not None
    assert book.largest_card_bytes() == 79 * GI


def test_each_container_gets_a_card_and_they_see_each_other() -> None:
    book = new_ledger(overhead=0)
    book.set_node(N1, report("n1", 2, total=24 * GI))
    grant = book.reserve(request(20, sidecar=20), N1, policy="binpack")
    assert sorted(a.index for a in grant.allocations) == [0, 1]
    assert [a.container for a in grant.allocations] == ["main", "sidecar"]
    assert book.check(N1, request(20, sidecar=20), policy="binpack") is not None


def test_a_second_reserve_of_the_same_pod_returns_its_grant_or_conflicts() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1))
    book.set_node(N2, report("n2", 1))
    first = book.reserve(request(10, uid="u"), N1, policy="binpack")
    assert book.reserve(request(10, uid="u"), N1, policy="binpack") is first
    with pytest.raises(errors.Conflict, match="already holds GPU memory on node n1"):
        book.reserve(request(10, uid="u"), N2, policy="binpack")
    assert book.card_usage()[(N1, CardUUID("GPU-n1-0"))][0] == 10 * GI + OVERHEAD


def test_release_gives_memory_back() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1))
    book.reserve(request(70, uid="u"), N1, policy="binpack")
    assert book.check(N1, request(20), policy="binpack") is not None
    assert book.release("u") is not None
    assert book.check(N1, request(20), policy="binpack") is None
    assert book.release("u") is None


def test_a_node_report_arriving_later_counts_grants_made_before() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1))
    book.reserve(request(30, uid="u"), N1, policy="binpack")
    book.remove_node(N1)
    assert N1 not in book
    book.set_node(N1, report("n1", 1))
    assert book.card_usage()[(N1, CardUUID("GPU-n1-0"))][0] == 30 * GI + OVERHEAD


def test_resync_keeps_binds_in_flight_and_drops_what_the_listing_lacks() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 2))
    in_flight = book.reserve(request(10, uid="in-flight"), N1, policy="binpack")
    old = book.reserve(request(10, uid="old"), N1, policy="binpack")
    book.commit("old")
    listed = book.reserve(request(10, uid="listed"), N1, policy="binpack")
    book.commit("listed")
    book.resync(
        {"listed": (listed.pod, N1, listed.allocations)},
        listed_at=NOW.timestamp() + 1,
    )
    assert set(book.holdings()) == {"in-flight", "listed"}
    assert book.grant("listed").state == "observed"  # type: ignore[union-attr]
    assert in_flight.state == "reserved"
    assert old.uid not in book.holdings()


def test_a_request_too_large_for_any_card_is_unresolvable() -> None:
    book = new_ledger()
    book.set_node(N1, report("n1", 1, total=24 * GI))
    book.set_node(N2, report("n2", 1, total=80 * GI))
    big = ledger.too_large(
        request(80), largest_card_bytes=book.largest_card_bytes(), overhead=book.overhead_bytes
    )
    assert big is not None
    assert big.message == (
        "container 'main' asks for 80 GiB plus 66 MiB for its MPS server but the largest GPU in"
        " the cluster holds 80 GiB"
    )
    assert (
        ledger.too_large(
            request(79), largest_card_bytes=book.largest_card_bytes(), overhead=book.overhead_bytes
        )
        is None
    )


@pytest.mark.parametrize(
    ("policy", "used", "score"),
    [("binpack", 0, 1), ("binpack", 64, 9), ("spread", 0, 9), ("spread", 64, 1)],
    ids=["binpack-empty", "binpack-full", "spread-empty", "spread-full"],
)
def test_scores_run_from_0_to_10(policy: str, used: int, score: int) -> None:
    book = new_ledger(overhead=0)
    book.set_node(N1, report("n1", 1))
    if used:
        book.reserve(request(used, uid="x"), N1, policy="binpack")
    assert book.score(N1, request(8), policy=policy) == score  # type: ignore[arg-type]
    assert book.score(NodeName("ghost"), request(8), policy="binpack") == 0


@settings(max_examples=200, deadline=None)
@given(
    report=strategies.node_reports(),
    held=st.lists(st.integers(1, 60), max_size=6),
    units=st.integers(1, 90),
    policy=st.sampled_from(placement.POLICIES),
)
def test_scores_agree_with_the_placement_policy(
    report: nodereport.NodeReport, held: list[int], units: int, policy: placement.Policy
) -> None:
    book = ledger.Ledger(
        overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=1e12, clock=report.heartbeat.timestamp
    )
    book.set_node(N1, report)
    for position, size in enumerate(held):
        with contextlib.suppress(errors.NoFit):
            book.reserve(request(size, uid=f"held-{position}"), N1, policy="binpack")
    fits, _ = placement.split(book.cards(), units * GI, overhead_bytes=OVERHEAD)
    best = placement.best(fits, policy)
    expected = 0 if best is None else placement.score(best, policy)
    assert book.score(N1, request(units), policy=policy) == expected
    assert (book.check(N1, request(units), policy=policy) is None) == (best is not None)


@settings(max_examples=100, deadline=None)
@given(
    reports=st.lists(strategies.node_reports(max_cards=12), min_size=1, max_size=5),
    units=st.integers(1, 90),
    policy=st.sampled_from(placement.POLICIES),
)
def test_nodes_scored_together_score_as_each_alone(
    reports: list[nodereport.NodeReport], units: int, policy: placement.Policy
) -> None:
    book = ledger.Ledger(overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=1e12, clock=lambda: 0)
    names = [NodeName(f"n{i}") for i in range(len(reports))]
    for name, rep in zip(names, reports, strict=True):
        book.set_node(name, rep)
    expected = []
    for name in names:
        cards = [card for card in book.cards() if card.node == name]
        fits, _ = placement.split(cards, units * GI, overhead_bytes=OVERHEAD)
        best = placement.best(fits, policy)
        expected.append(0 if best is None else placement.score(best, policy))
    together = book.scores([*names, "ghost"], request(units), policy=policy).tolist()
    assert together == [*expected, 0]


FILLERS = 1030
"""More nodes than the ledger's first arrays hold (1,024 slots): the drawn ones sit past them."""


@settings(max_examples=60, deadline=None)
@given(
    reports=st.lists(strategies.node_reports(max_cards=12), min_size=1, max_size=4),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.integers(1, 90)), max_size=12
    ),
    units=st.integers(1, 90),
    policy=st.sampled_from(placement.POLICIES),
)
def test_cached_scores_follow_reserves_and_releases_past_the_first_slots(
    reports: list[nodereport.NodeReport],
    steps: list[tuple[bool, int, int]],
    units: int,
    policy: placement.Policy,
) -> None:
    book = ledger.Ledger(overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=1e12, clock=lambda: 0)
    fillers = [NodeName(f"filler-{i}") for i in range(FILLERS)]
    for name in fillers:
        book.set_node(name, report(name, 2))
    names = [NodeName(f"n{i}") for i in range(len(reports))]
    for name, rep in zip(names, reports, strict=True):
        book.set_node(name, rep)
    everyone = [*fillers, *names]
    held: list[str] = []
    for serial, (release, which, size) in enumerate(steps):
        book.scores(everyone, request(units), policy=policy)  # fills the caches the step changes
        if release and held:
            book.release(held.pop(which % len(held)))
        else:
            uid = f"held-{serial}"
            with contextlib.suppress(errors.NoFit):
                book.reserve(request(size, uid=uid), names[which % len(names)], policy=policy)
                held.append(uid)
    scores = book.scores(everyone, request(units), policy=policy).tolist()
    for position, name in [(0, fillers[0]), *enumerate(names, start=FILLERS)]:
        cards = [card for card in book.cards() if card.node == name]
        fits, _ = placement.split(cards, units * GI, overhead_bytes=OVERHEAD)
        best = placement.best(fits, policy)
        assert scores[position] == (0 if best is None else placement.score(best, policy)), name
