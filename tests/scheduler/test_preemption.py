"""Preemption: kube-scheduler's victims checked against card memory, chosen again on one card."""

import itertools
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushare.core import placement
from gpushare.core.ids import CardUUID, NodeName, pod_key
from gpushare.scheduler import ledger, preemption
from gpushare.scheduler.service import Extender
from tests.scheduler.objects import GI, pod, report


def _card(granted_gib: int, *, capacity: int = 40 * GI, free: int | None = None) -> placement.Card:
    return placement.Card(
        node=NodeName("n"), uuid=CardUUID("GPU-n-0"), index=0, capacity_bytes=capacity,
        granted_bytes=int(granted_gib * GI), free_bytes=free,
    )


def _holder(uid: str, gib: int, priority: int) -> preemption.Holder:
    return preemption.Holder(uid, priority, gib * GI)


@pytest.mark.parametrize(
    ("card", "holders", "cost_gib", "victims"),
    [
        # 4 GiB left; 30 needed: one 30 frees enough where two 20s would too.
        (_card(36), [("a", 20, 1), ("b", 30, 5), ("c", 16, 1)], 30, ["b"]),
        # Two victims either way: the lower highest priority wins, then the lower sum.
        (_card(36), [("a", 20, 5), ("b", 20, 1), ("c", 16, 1)], 30, ["b", "c"]),
        # Same count and priorities: the least memory freed.
        (_card(36), [("a", 30, 1), ("b", 27, 1)], 30, ["b"]),
        # Never more than needed: one of three is enough.
        (_card(40), [("a", 10, 1), ("b", 10, 1), ("c", 20, 1)], 10, ["a"]),
        # Nothing below the preemptor frees enough.
        (_card(36), [("a", 10, 1), ("b", 10, 1)], 30, None),
        # Memory used outside every grant stays used: 10 GiB foreign leaves 30 after the 20 goes.
        (_card(20, free=10 * GI), [("a", 20, 1)], 30, ["a"]),
        (_card(20, free=10 * GI), [("a", 20, 1)], 31, None),
    ],
    ids=[
        "fewest", "lowest-priority", "least-freed", "never-more", "not-enough", "foreign-use",
        "foreign-use-too-much",
    ],
)
def test_victims_on_a_card_are_the_fewest_then_the_lowest_priority(
    card: placement.Card,
    holders: list[tuple[str, int, int]],
    cost_gib: int,
    victims: list[str] | None,
) -> None:
    choice = preemption.choose_on_card(
        card, [_holder(*h) for h in holders], cost_gib * GI
    )
    assert (None if choice is None else sorted(h.uid for h in choice.victims)) == victims


@given(
    granted=st.integers(0, 80),
    holders=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), max_size=8),
    cost=st.integers(1, 80),
)
def test_a_choice_frees_enough_with_the_fewest_lowest_pods_each_of_them_needed(
    granted: int, holders: list[tuple[int, int]], cost: int
) -> None:
    card = _card(granted, capacity=80 * GI)
    pool = [_holder(f"h{i}", gib, priority) for i, (gib, priority) in enumerate(holders)]
    need = cost * GI - card.room_bytes
    choice = preemption.choose_on_card(card, pool, cost * GI)
    enough = [
        combo
        for count in range(1, len(pool) + 1)
        for combo in itertools.combinations(pool, count)
        if sum(h.freed_bytes for h in combo) >= need
    ]
    if need <= 0 or not enough:
        assert choice is None
        return
    assert choice is not None
    freed = sum(h.freed_bytes for h in choice.victims)
    assert freed >= need
    fewest = [combo for combo in enough if len(combo) == min(map(len, enough))]
    assert len(choice.victims) == len(fewest[0])
    assert max(h.priority for h in choice.victims) == min(
        max(h.priority for h in combo) for combo in fewest
    )
    assert all(freed - h.freed_bytes < need for h in choice.victims)  # none could stay


def test_a_card_with_room_needs_no_victim() -> None:
    assert preemption.choose_on_card(_card(0), [_holder("a", 10, 1)], 10 * GI) is None


# --- over HTTP, as kube-scheduler calls it -----------------------------------------------------

NODE = NodeName("n")


def _hold(book: ledger.Ledger, uid: str, card: int, gib: int, priority: int) -> None:
    allocation = ledger.Allocation("kserve-container", CardUUID(f"GPU-n-{card}"), card, 40 * GI,
                                   gib * GI)
    book.observe(uid, pod_key("ns", uid), NODE, (allocation,), priority=priority)


def _preemptor(gib: int, priority: int) -> dict[str, Any]:
    body = pod("urgent", gib, uid="urgent")
    body["spec"]["priority"] = priority
    return body


async def _preempt(
    http: aiohttp.ClientSession, ext: Extender, body: dict[str, Any], victims: list[str]
) -> dict[str, Any]:
    args = {
        "Pod": body,
        "NodeNameToVictims": None,
        "NodeNameToMetaVictims": {
            NODE: {"Pods": [{"UID": uid} for uid in victims], "NumPDBViolations": 1}
        },
    }
    async with http.post(f"{ext.url}/preempt", json=args) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


def _two_cards(ext: Extender, *, guard_priority: int) -> None:
    """Two 40 GiB cards, each holding a 20 (priority 100) and a 16 (``guard_priority``)."""
    ext.book.set_node(NODE, report("n", 2, total=40 * GI, heartbeat=datetime.now(UTC)))
    _hold(ext.book, "p", 0, 20, 100)
    _hold(ext.book, "r", 0, 16, guard_priority)
    _hold(ext.book, "q", 1, 20, 100)
    _hold(ext.book, "s", 1, 16, guard_priority)


async def test_victims_that_free_no_card_are_refused(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    # kube-scheduler frees 40 GiB of the node's total with p and q, but each card keeps its 16 of
    # a higher priority than the preemptor's: no card gets 30 GiB, so the node is left out.
    _two_cards(extender, guard_priority=2000)
    answer = await _preempt(http, extender, _preemptor(30, 1000), ["p", "q"])
    assert answer == {"NodeNameToMetaVictims": {}}


async def test_victims_are_chosen_again_on_one_card(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    # The same node with every pod below the preemptor: p and r empty card 0 (the first card of
    # the tie), instead of p and q, which would free 20 GiB on each card and 30 on neither.
    _two_cards(extender, guard_priority=100)
    answer = await _preempt(http, extender, _preemptor(30, 1000), ["p", "q"])
    assert answer == {
        "NodeNameToMetaVictims": {
            NODE: {"Pods": [{"UID": "p"}, {"UID": "r"}], "NumPDBViolations": 1}
        }
    }


async def test_victims_without_card_memory_stay_and_the_fewest_on_a_card_join_them(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    # "cpu-hog" holds no card memory: kube-scheduler chose it for its own reasons, so it stays.
    extender.book.set_node(NODE, report("n", 1, total=40 * GI, heartbeat=datetime.now(UTC)))
    _hold(extender.book, "a", 0, 10, 100)
    _hold(extender.book, "b", 0, 10, 50)
    _hold(extender.book, "c", 0, 19, 100)
    answer = await _preempt(http, extender, _preemptor(10, 1000), ["cpu-hog", "a", "b", "c"])
    assert answer["NodeNameToMetaVictims"][NODE]["Pods"] == [{"UID": "cpu-hog"}, {"UID": "b"}]


async def test_a_malformed_preempt_call_is_a_400(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{extender.url}/preempt", json={"NodeNameToMetaVictims": {}}) as resp:
        assert resp.status == 400
        assert "ExtenderPreemptionArgs: Pod: Field required" in await resp.text()



async def test_a_node_whose_agent_went_silent_is_refused(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    # Evicting there would free memory that no pod could be placed on: the filter refuses the node.
    _two_cards(extender, guard_priority=100)
    stale = report("n", 2, total=40 * GI, heartbeat=datetime(2020, 1, 1, tzinfo=UTC))
    extender.book.set_node(NODE, stale)
    answer = await _preempt(http, extender, _preemptor(30, 1000), ["p", "q"])
    assert answer == {"NodeNameToMetaVictims": {}}
