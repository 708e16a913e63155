"""Hypothesis drives the ledger through node reports, losses, removals, silent agents, grants,
releases, resyncs and crowds that grow the room index past its first 1,024 slots; after every step
the index's answers (which nodes pass, why the others fail, each passing node's score) equal
:mod:`gpushare.core.placement` applied to a plain model of the same nodes and grants."""

from collections import Counter
from datetime import UTC, datetime

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gpushare.core import errors, grants, nodereport, placement
from gpushare.core.ids import CardUUID, NodeName
from gpushare.scheduler import ledger, roomindex
from gpushare.scheduler.candidates import Candidates
from tests import strategies
from tests.scheduler.objects import GI, OVERHEAD, card, request

TIMEOUT = 100.0
"""Seconds an agent's report stays fresh."""
POOL = tuple(NodeName(f"n{i}") for i in range(6))
"""Nodes whose reports Hypothesis draws."""
CROWD = 2 * roomindex.FIRST_SLOTS
"""Filler nodes the crowd rule may add, enough to grow the index's arrays."""
FILLERS = tuple(NodeName(f"filler-{i}") for i in range(CROWD))
WATCHED = (*POOL, NodeName("ghost"), *FILLERS[::41], *FILLERS[-3:])
"""The nodes asked about after every step: the drawn ones, one never seen, fillers on both sides
of the first arrays' end."""
SIZES = (1 * GI, 7 * GI, 40 * GI)
COSTS = grants.Overheads(per_card=0, per_allocation=OVERHEAD)


def _filler(name: NodeName, serial: int, at: datetime) -> nodereport.NodeReport:
    """Two cards whose sizes and use vary with ``serial``: the fillers differ from each other."""
    total = (24, 48, 80)[serial % 3] * GI
    return nodereport.NodeReport(
        heartbeat=at,
        cards=(
            card(0, total=total, used=(serial % 7) * GI, node=name),
            card(1, total=total, healthy=serial % 5 != 0, node=name),
        ),
    )


class RoomIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
        self.book = ledger.Ledger(
            overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=TIMEOUT, clock=lambda: self.now
        )
        self.reports: dict[NodeName, nodereport.NodeReport | None] = {}
        """The model: each known node's report (``None``: it has none)."""
        self.held: dict[str, tuple[NodeName, tuple[ledger.Allocation, ...]]] = {}
        self.crowded = 0
        self.serial = 0
        self.watched = Candidates(list(WATCHED))
        """One list asked about again and again, as kube-scheduler does: its slots are reused."""

    def _at(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    @initialize()
    def start(self) -> None:
        for serial, name in enumerate(POOL[:3]):
            self._set(name, _filler(name, serial, self._at()))

    def _set(self, name: NodeName, report: nodereport.NodeReport | None) -> None:
        self.book.set_node(name, report)
        self.reports[name] = report

    @rule(name=st.sampled_from(POOL), drawn=strategies.node_reports(max_cards=10))
    def report(self, name: NodeName, drawn: nodereport.NodeReport) -> None:
        self._set(name, drawn.model_copy(update={"heartbeat": self._at()}))

    @rule(name=st.sampled_from(POOL))
    def lose_report(self, name: NodeName) -> None:
        self._set(name, None)

    @precondition(lambda self: self.reports)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.reports)))
        current = self.reports[name]
        if current is not None:
            self._set(name, current.model_copy(update={"heartbeat": self._at()}))

    @precondition(lambda self: self.reports)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.reports)))
        self.book.remove_node(name)
        del self.reports[name]

    @precondition(lambda self: self.crowded < CROWD)
    @rule(count=st.integers(100, 800))
    def crowd(self, count: int) -> None:
        for serial in range(self.crowded, min(CROWD, self.crowded + count)):
            self._set(FILLERS[serial], _filler(FILLERS[serial], serial, self._at()))
        self.crowded = min(CROWD, self.crowded + count)

    @rule(seconds=st.sampled_from((0.0, 1.0, 60.0, TIMEOUT + 1)))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.reports)
    @rule(
        data=st.data(),
        units=st.integers(1, 60),
        sidecar=st.none() | st.integers(1, 8),
        policy=st.sampled_from(placement.POLICIES),
    )
    def reserve(
        self, data: st.DataObject, units: int, sidecar: int | None, policy: placement.Policy
    ) -> None:
        name = data.draw(st.sampled_from(sorted(self.reports)))
        self.serial += 1
        uid = f"pod-{self.serial}"
        wanted = request(units, uid=uid, sidecar=sidecar) if sidecar else request(units, uid=uid)
        try:
            grant = self.book.reserve(wanted, name, policy=policy)
        except errors.NoFit:
            return
        self.held[uid] = (name, grant.allocations)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        uid = data.draw(st.sampled_from(sorted(self.held)))
        if commit:
            self.book.commit(uid)
        else:
            self.book.release(uid)
            del self.held[uid]

    @rule()
    def resync(self) -> None:
        """A relist that shows every held pod bound (none missing: nothing is released)."""
        self.now += 1
        listing = {uid: (request(1, uid=uid).key, n, a) for uid, (n, a) in self.held.items()}
        self.book.resync(listing, listed_at=self.now)

    # --- the plain computation ----------------------------------------------------------------

    def _cards(self, name: NodeName) -> list[placement.Card]:
        report = self.reports[name]
        assert report is not None
        granted: Counter[CardUUID] = Counter()
        for node, allocations in self.held.values():
            if node == name:
                for allocation in allocations:
                    granted[allocation.card] += allocation.granted_bytes + OVERHEAD
        return [
            placement.Card(
                node=name,
                uuid=c.uuid,
                index=c.index,
                capacity_bytes=grants.grantable_bytes(c.cuda_total_bytes, COSTS),
                granted_bytes=granted[c.uuid],
                free_bytes=c.free_bytes,
                healthy=c.healthy,
            )
            for c in report.cards
        ]

    def _plain(
        self, name: NodeName, cost: int, policy: placement.Policy
    ) -> ledger.Reason | tuple[ledger.Reason, str] | int:
        """The node's score when it takes ``cost``, else its failure reason (and the message,
        for a node that answers)."""
        if name not in self.reports:
            return ledger.Reason.UNKNOWN_NODE
        report = self.reports[name]
        if report is None:
            return ledger.Reason.NO_REPORT
        if report.heartbeat.timestamp() + TIMEOUT < self.now:
            return ledger.Reason.STALE
        cards = self._cards(name)
        fits, misses = placement.split(cards, cost)
        best = placement.best(fits, policy)
        if best is None:
            unhealthy = cards and not any(c.healthy for c in cards)
            reason = ledger.Reason.UNHEALTHY if unhealthy else ledger.Reason.NO_ROOM
            return reason, placement.explain(misses, cost)
        return placement.score(best, policy)

    @invariant()
    def the_ledger_holds_what_was_granted(self) -> None:
        assert self.book.holdings() == self.held

    @invariant()
    def the_index_answers_as_placement_does(self) -> None:
        for size in SIZES:
            for policy in placement.POLICIES:
                wanted = request(size // GI)
                passed, failed = self.book.split(self.watched, wanted, policy=policy)
                scores = self.book.scores(self.watched, wanted, policy=policy).tolist()
                again = self.book.scores(passed, wanted, policy=policy).tolist()
                cost = size + OVERHEAD
                by_name = dict(zip(self.watched.names, scores, strict=True))
                assert again == [by_name[name] for name in passed.names]
                for name in self.watched.names:
                    expected = self._plain(NodeName(name), cost, policy)
                    if isinstance(expected, int):
                        assert name in passed.names, (name, failed.get(name))
                        assert by_name[name] == expected, (name, policy, size)
                    elif isinstance(expected, tuple):
                        assert (failed[name].reason, failed[name].message) == expected, name
                    else:
                        assert failed[name].reason == expected, (name, failed[name])


RoomIndexMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None
)
TestRoomIndexMachine = RoomIndexMachine.TestCase
