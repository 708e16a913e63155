"""Hypothesis plays arrivals, binds in flight side by side, watch events, deletions and restarts
against the ledger and a model of the apiserver's pods: no card is ever granted more than it
holds, and a ledger rebuilt from the pods' annotations equals the one it replaces."""

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpushare.core import errors
from gpushare.core.ids import CardUUID, NodeName, PodKey
from gpushare.scheduler import annotations, demand, ledger, wire
from tests.scheduler.objects import GI, NOW, OVERHEAD, SETTINGS, pod, report

NODES = {
    NodeName("a"): report("a", 2, total=24 * GI),
    NodeName("b"): report("b", 1, total=80 * GI),
    NodeName("c"): report("c", 4, total=16 * GI),
}


def _fresh_ledger(clock: Callable[[], float]) -> ledger.Ledger:
    book = ledger.Ledger(overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=3600, clock=clock)
    for name, rep in NODES.items():
        book.set_node(name, rep)
    return book


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = NOW.timestamp()
        self.book = _fresh_ledger(self.clock)
        self.store: dict[str, dict[str, Any]] = {}
        """The apiserver's pods by UID."""
        self.in_flight: dict[str, ledger.Grant] = {}
        """Binds whose Binding has not answered yet."""
        self.unseen: set[str] = set()
        """Pods bound in the store whose watch event the ledger has not had yet."""
        self.serial = 0
        self.missed = False
        """A pod went while the watch was down: only a listing can tell."""

    def clock(self) -> float:
        """Every look at the clock is a second later: the order of events is the order of time."""
        self.now += 1
        return self.now

    def _request(self, uid: str) -> demand.PodRequest:
        return demand.from_pod(wire.Pod.model_validate(self.store[uid]), unit_bytes=GI)

    @rule(units=st.integers(1, 40), sidecar=st.none() | st.integers(1, 12))
    def arrive(self, units: int, sidecar: int | None) -> None:
        self.serial += 1
        uid = f"u{self.serial}"
        extra = {"sidecar": sidecar} if sidecar else None
        self.store[uid] = pod(f"p{self.serial}", units, uid=uid, extra_containers=extra)
        self.book.remember(self._request(uid))

    @precondition(lambda self: self.store)
    @rule(
        data=st.data(),
        node=st.sampled_from(sorted(NODES)),
        policy=st.sampled_from(("binpack", "spread")),
    )
    def start_bind(self, data: st.DataObject, node: NodeName, policy: str) -> None:
        pending = sorted(
            u
            for u, p in self.store.items()
            if "nodeName" not in p["spec"] and u not in self.in_flight
        )
        if not pending:
            return
        uid = data.draw(st.sampled_from(pending))
        try:
            grant = self.book.reserve(self._request(uid), node, policy=policy)  # type: ignore[arg-type]
        except (errors.NoFit, errors.Conflict):
            return
        self.in_flight[uid] = grant

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), landed=st.booleans())
    def finish_bind(self, data: st.DataObject, landed: bool) -> None:
        uid = data.draw(st.sampled_from(sorted(self.in_flight)))
        self._settle(uid, landed)

    def _settle(self, uid: str, landed: bool) -> None:
        grant = self.in_flight.pop(uid)
        if landed and uid in self.store:
            obj = self.store[uid]
            obj["spec"]["nodeName"] = grant.node
            obj["metadata"]["annotations"].update(
                annotations.encode(grant.allocations, bind_time=datetime.now(UTC))
            )
            self.unseen.add(uid)
            self.book.commit(uid)
        elif self.book.grant(uid) is grant and grant.state == "reserved":
            self.book.release(uid)

    @precondition(lambda self: self.unseen)
    @rule(data=st.data())
    def watch_event(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.unseen)))
        self._deliver(uid)

    def _deliver(self, uid: str) -> None:
        self.unseen.discard(uid)
        if uid not in self.store:
            return
        obj = self.store[uid]
        request = self._request(uid)
        found = annotations.decode(obj["metadata"]["annotations"], request)
        assert found is not None
        self.book.observe(uid, request.key, NodeName(obj["spec"]["nodeName"]), found)

    @precondition(lambda self: self.store)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.store)))
        del self.store[uid]
        self.unseen.discard(uid)
        self.in_flight.pop(uid, None)  # its Binding will fail: the pod is gone
        self.book.release(uid)  # the watch's DELETED

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        # The process dies: each Binding in flight landed or not; the old ledger, had it lived,
        # would have settled them and seen every event. The new one lists the pods.
        for uid in sorted(self.in_flight):
            self._settle(uid, data.draw(st.booleans(), label=f"{uid} landed"))
        for uid in sorted(self.unseen):
            self._deliver(uid)
        fresh = _fresh_ledger(self.clock)
        fresh.resync(self._listing(), listed_at=self.clock())
        if not self.missed:
            assert fresh.holdings() == self.book.holdings()
            assert fresh.card_usage() == self.book.card_usage()
        self.book = fresh
        self.missed = False

    @precondition(lambda self: self.store)
    @rule(data=st.data())
    def delete_while_the_watch_is_down(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.store)))
        del self.store[uid]
        self.unseen.discard(uid)
        self.missed = True

    @rule()
    def relist_after_410_gone(self) -> None:
        self.book.resync(self._listing(), listed_at=self.clock())
        self.unseen.clear()
        self.missed = False
        expected = {
            uid: (node, allocations) for uid, (_, node, allocations) in self._listing().items()
        }
        expected.update({uid: (g.node, g.allocations) for uid, g in self.in_flight.items()})
        assert self.book.holdings() == expected

    def _listing(self) -> dict[str, tuple[PodKey, NodeName, tuple[ledger.Allocation, ...]]]:
        listed = {}
        for uid, obj in self.store.items():
            if "nodeName" in obj["spec"]:
                request = self._request(uid)
                found = annotations.decode(obj["metadata"]["annotations"], request)
                assert found is not None
                listed[uid] = (request.key, NodeName(obj["spec"]["nodeName"]), found)
        return listed

    @invariant()
    def no_card_is_overcommitted(self) -> None:
        for (node, card), (granted, capacity) in self.book.card_usage().items():
            assert granted <= capacity, f"{node}/{card}: {granted} > {capacity}"

    @invariant()
    def the_apis_pods_never_overcommit_either(self) -> None:
        usage: dict[CardUUID, int] = {}
        for uid, obj in self.store.items():
            if "nodeName" in obj["spec"]:
                found = annotations.decode(obj["metadata"]["annotations"], self._request(uid))
                for allocation in found or ():
                    usage[allocation.card] = usage.get(allocation.card, 0) + (
                        allocation.granted_bytes + self.book.overhead_bytes
                    )
        capacity = {card.uuid: card.capacity_bytes for card in self.book.cards()}
        for card, used in usage.items():
            assert used <= capacity[card]


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
assert SETTINGS.unit_bytes == GI
