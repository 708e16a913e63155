"""The ledger: per node and card, what the agent reports and what pods hold.

No I/O and no ``await``: every method runs to its end on the event loop, which is what makes a
reservation atomic. :meth:`Ledger.reserve` records the pod's cards *before* the Binding is posted;
a failed post releases them. Two binds racing for the last room on a card are serialized by the
loop: the second sees the first's grant and goes to another card or fails. There is no node lock.

A grant moves through three states: ``reserved`` (recorded, Binding in flight), ``bound`` (our
Binding was accepted) and ``observed`` (seen in the API with its annotations, the truth after a
restart). Each card's granted memory is the sum of its grants plus one per-allocation overhead
(``Settings.allocation_overhead_bytes``).

This module is the grant state machine: nodes, grants and pending requests in dicts, and each
node's cards as :mod:`gpushare.core.placement` sees them. Filtering thousands of nodes must cost
little per node, so every change is mirrored into the room index
(:mod:`gpushare.scheduler.roomindex`): a single-container request is checked against all
candidates in one vectorized comparison, with scores and failure reasons cached until their node
next changes. Nodes whose heartbeat runs out are closed in the index when the earliest deadline
passes, not checked on every call.
"""

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from gpushare.core import errors, grants, placement
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, NodeName, PodKey
from gpushare.core.nodereport import NodeReport
from gpushare.core.quantities import format_bytes
from gpushare.scheduler.candidates import Candidates
from gpushare.scheduler.demand import Demand, PodRequest, Revision
from gpushare.scheduler.failures import Failure, Reason
from gpushare.scheduler.roomindex import RoomIndex, Scores

__all__ = [
    "Allocation",
    "Failure",
    "Grant",
    "Ledger",
    "Reason",
    "Scores",
    "too_large",
]

GrantState = Literal["reserved", "bound", "observed"]


@dataclass(slots=True)
class Grant:
    """What one pod holds on one node."""

    uid: str
    pod: PodKey
    node: NodeName
    allocations: tuple[Allocation, ...]
    state: GrantState
    since: float
    """Clock time of the last change of state."""
    priority: int = 0
    """The pod's priority, for preemption."""
    revision: Revision | None = None
    """The Deployment revision of the pod, when a ReplicaSet controls it (rollouts)."""


class _Node:
    """One node: its agent's report, and its cards as placement sees them after the last change."""

    __slots__ = (
        "capacities",
        "fresh_until",
        "problem",
        "report",
        "views",
    )

    def __init__(self) -> None:
        self.report: NodeReport | None = None
        self.problem: Failure | None = None
        self.fresh_until = -math.inf
        self.views: tuple[placement.Card, ...] = ()
        self.capacities: tuple[int, ...] = ()


class Ledger:
    """Nodes, cards and grants, keyed by node name and pod UID.

    Changes mark their node dirty; every question first brings dirty nodes up to date, so that a
    relist of 20,000 pods recomputes each node once, not once per pod.
    """

    def __init__(
        self,
        *,
        overhead_bytes: int,
        heartbeat_timeout_seconds: float,
        card_overhead_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.overhead_bytes = overhead_bytes
        self._costs = grants.Overheads(per_card=card_overhead_bytes, per_allocation=overhead_bytes)
        """What no grant may use: once per card (the shared MPS server in ``mps-shared``), and
        once per allocation (its own MPS server in ``mps``)."""
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.clock = clock
        """Seconds since the epoch (heartbeats are wall-clock times)."""
        self._nodes: dict[NodeName, _Node] = {}
        self._grants: dict[str, Grant] = {}
        self._by_node: dict[NodeName, dict[str, Grant]] = {}
        self._requests: dict[str, tuple[PodRequest, float]] = {}
        self._capacities: Counter[int] = Counter()
        self._dirty: set[NodeName] = set()
        self._index = RoomIndex()
        """The vectorized mirror of every node's room, for filtering and scoring."""
        self._next_sweep = math.inf
        """When the next node's heartbeat runs out (or earlier)."""
        self._stale_failure = Failure(
            Reason.STALE,
            f"GPU agent silent: its last report is older than {heartbeat_timeout_seconds:g} s",
        )

    # --- nodes ------------------------------------------------------------------------------------

    def set_node(
        self, name: NodeName, report: NodeReport | None, *, problem: Failure | None = None
    ) -> None:
        """Record a node's report, or the problem that keeps it from having one."""
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node()
            self._index.add(name)
        self._capacities.subtract(node.capacities)
        node.report = None if problem is not None else report
        node.problem = problem
        if node.report is None and problem is None:
            node.problem = Failure(Reason.NO_REPORT, "node has no GPU agent report")
        if node.report is not None:
            node.fresh_until = node.report.heartbeat.timestamp() + self.heartbeat_timeout_seconds
            node.capacities = tuple(card.cuda_total_bytes for card in node.report.cards)
        else:
            node.fresh_until = -math.inf
            node.capacities = ()
        self._capacities.update(node.capacities)
        self._dirty.add(name)

    def remove_node(self, name: NodeName) -> None:
        """Forget a deleted node (its pods' grants stay until the pods go)."""
        node = self._nodes.pop(name, None)
        if node is not None:
            self._capacities.subtract(node.capacities)
        self._dirty.discard(name)
        self._index.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def node_names(self) -> list[NodeName]:
        return list(self._nodes)

    def largest_card_bytes(self) -> int:
        """What grants may use of the largest card of any node (0 when none is known)."""
        largest = max((size for size, count in self._capacities.items() if count > 0), default=0)
        return grants.grantable_bytes(largest, self._costs)

    def cards(self) -> Iterator[placement.Card]:
        """Every card of every node as placement sees it now."""
        self._settle(self.clock())
        for node in self._nodes.values():
            yield from node.views

    def node_states(self, *, now: float | None = None) -> Counter[str]:
        """How many nodes are ``ready``, ``stale`` or have each problem."""
        moment = self.clock() if now is None else now
        states: Counter[str] = Counter()
        for node in self._nodes.values():
            if node.problem is not None:
                states[node.problem.reason.value] += 1
            elif node.fresh_until < moment:
                states[Reason.STALE.value] += 1
            else:
                states["ready"] += 1
        return states

    def settle(self) -> None:
        """Bring every changed node up to date now (after a listing), not in the next call."""
        self._settle(self.clock())

    # --- questions --------------------------------------------------------------------------------

    def split(
        self,
        names: Sequence[str] | Candidates,
        request: PodRequest,
        *,
        policy: placement.Policy,
        now: float | None = None,
    ) -> tuple[Candidates, dict[str, Failure]]:
        """The nodes that can take the pod, and for the others why not.

        When every candidate passes, the first is ``names`` itself if that is a :class:`Candidates`.
        """
        moment = self.clock() if now is None else now
        self._settle(moment)
        candidates = names if isinstance(names, Candidates) else Candidates(list(names))
        if len(request.demands) == 1:
            cost = request.demands[0].bytes + self.overhead_bytes
            refused = self._index.refusing(candidates, cost)
            if not refused.size:
                return candidates, {}
            cached = self._index.failures(cost)
            every = candidates.names
            failed = {}
            for i in refused.tolist():
                name = every[i]
                failure = cached.get(name)
                if failure is None:
                    failure = self._single_failure(NodeName(name), cost, moment)
                    if name in self._nodes:
                        cached[name] = failure
                failed[name] = failure
            return candidates.without(refused), failed
        passed = []
        failed = {}
        for name in candidates.names:
            failure = self._multi_failure(NodeName(name), request, policy, moment)
            if failure is None:
                passed.append(name)
            else:
                failed[name] = failure
        return Candidates(passed), failed

    def check(
        self,
        name: NodeName,
        request: PodRequest,
        *,
        policy: placement.Policy,
        now: float | None = None,
    ) -> Failure | None:
        """Why the node cannot take the pod, or ``None`` when it can."""
        _, failed = self.split([name], request, policy=policy, now=now)
        return failed.get(name)

    def scores(
        self, names: Sequence[str] | Candidates, request: PodRequest, *, policy: placement.Policy
    ) -> Scores:
        """0 to 10 per node: how much ``policy`` likes the card it would give (0: none fits)."""
        self._settle(self.clock())
        candidates = names if isinstance(names, Candidates) else Candidates(list(names))
        if not request.demands:
            return np.zeros(len(candidates), dtype=np.int8)
        if len(request.demands) > 1:
            return np.array(
                [self._multi_score(NodeName(name), request, policy) for name in candidates.names],
                dtype=np.int8,
            )
        cost = request.demands[0].bytes + self.overhead_bytes
        return self._index.scores(candidates, cost, policy)

    def score(self, name: NodeName, request: PodRequest, *, policy: placement.Policy) -> int:
        """One node's score (see :meth:`scores`)."""
        return int(self.scores([name], request, policy=policy)[0])

    # --- grants -----------------------------------------------------------------------------------

    def reserve(
        self,
        request: PodRequest,
        name: NodeName,
        *,
        policy: placement.Policy,
        now: float | None = None,
    ) -> Grant:
        """Choose the pod's cards on ``name`` and record them, before the Binding is posted.

        A second call for the same pod and node returns the grant it already has. Raises
        :class:`NoFit` with the reason when the node cannot take the pod, and :class:`Conflict`
        when the pod already holds memory on another node.
        """
        existing = self._grants.get(request.uid)
        if existing is not None:
            if existing.node == name:
                return existing
            raise errors.Conflict(
                f"pod {request.key} already holds GPU memory on node {existing.node}"
            )
        moment = self.clock() if now is None else now
        self._settle(moment)
        node = self._nodes.get(name)
        failure = self._node_failure(node, moment)
        if failure is not None or node is None:
            raise errors.NoFit(failure.message if failure else "unknown node")
        placed = self._place(node, request.demands, policy)
        allocations = tuple(
            Allocation(
                container=demand.container,
                card=fit.card.uuid,
                index=fit.card.index,
                card_total_bytes=fit.card.capacity_bytes,
                granted_bytes=demand.bytes,
            )
            for demand, fit in placed
        )
        grant = Grant(
            request.uid,
            request.key,
            name,
            allocations,
            "reserved",
            moment,
            request.priority,
            request.revision,
        )
        self._add(grant)
        return grant

    def commit(self, uid: str) -> None:
        """Our Binding was accepted."""
        grant = self._grants.get(uid)
        if grant is not None and grant.state == "reserved":
            grant.state = "bound"
            grant.since = self.clock()
        self._requests.pop(uid, None)

    def release(self, uid: str) -> Grant | None:
        """Give a pod's memory back (its bind failed, or it ended); returns what it held."""
        self._requests.pop(uid, None)
        grant = self._grants.pop(uid, None)
        if grant is not None:
            self._by_node[grant.node].pop(uid, None)
            self._dirty.add(grant.node)
        return grant

    def observe(
        self,
        uid: str,
        pod: PodKey,
        name: NodeName,
        allocations: tuple[Allocation, ...],
        *,
        priority: int = 0,
        revision: Revision | None = None,
    ) -> None:
        """Record what the API says a bound pod holds (its annotations are the truth)."""
        self._requests.pop(uid, None)
        existing = self._grants.get(uid)
        if existing is not None and existing.node == name and existing.allocations == allocations:
            existing.priority = priority
            existing.revision = revision
            if existing.state != "observed":
                existing.state = "observed"
                existing.since = self.clock()
            return
        if existing is not None:
            self.release(uid)
        self._add(Grant(uid, pod, name, allocations, "observed", self.clock(), priority, revision))

    def resync(
        self,
        listed: Mapping[str, tuple[PodKey, NodeName, tuple[Allocation, ...]]],
        *,
        listed_at: float,
        priorities: Mapping[str, int] | None = None,
        revisions: Mapping[str, Revision] | None = None,
    ) -> None:
        """Replace observed grants by a fresh listing of every bound pod's allocations.

        Grants missing from the listing go when the listing must have seen them: observed ones,
        and ours whose Binding was accepted before the listing began. Reservations still in
        flight stay (their bind settles them), and so do pods bound after the listing began.
        """
        for uid, (pod, name, allocations) in listed.items():
            self.observe(
                uid,
                pod,
                name,
                allocations,
                priority=(priorities or {}).get(uid, 0),
                revision=(revisions or {}).get(uid),
            )
        for uid, grant in list(self._grants.items()):
            if uid in listed:
                continue
            if grant.state == "observed" or (grant.state == "bound" and grant.since < listed_at):
                self.release(uid)

    def grant(self, uid: str) -> Grant | None:
        return self._grants.get(uid)

    def holdings(self) -> dict[str, tuple[NodeName, tuple[Allocation, ...]]]:
        """Every pod's node and allocations, by UID."""
        return {uid: (grant.node, grant.allocations) for uid, grant in self._grants.items()}

    def card_usage(self) -> dict[tuple[NodeName, CardUUID], tuple[int, int]]:
        """``(granted, capacity)`` bytes of every known card."""
        return {
            (card.node, card.uuid): (card.granted_bytes, card.capacity_bytes)
            for card in self.cards()
        }

    def other_revision_holds(self, request: PodRequest) -> bool:
        """Whether another revision of the pod's Deployment holds a grant: a rollout is under
        way, and the old pod keeps its memory until the new one runs (``maxSurge`` >= 1)."""
        revision = request.revision
        if revision is None:
            return False
        return any(
            grant.revision is not None
            and grant.revision.deployment == revision.deployment
            and grant.revision != revision
            and grant.pod.partition("/")[0] == request.namespace
            for grant in self._grants.values()
        )

    def grant_count(self) -> int:
        return len(self._grants)

    def grants_on(self, name: NodeName) -> list[Grant]:
        """The grants held on one node."""
        return list(self._by_node.get(name, {}).values())

    def node_cards(self, name: NodeName) -> tuple[placement.Card, ...]:
        """One node's cards as placement sees them now; none where the node may take no pod
        (unknown, without a report, or its agent silent)."""
        moment = self.clock()
        self._settle(moment)
        node = self._nodes.get(name)
        if node is None or self._node_failure(node, moment) is not None:
            return ()
        return node.views

    # --- requests of pods not yet bound -----------------------------------------------------------

    def remember(self, request: PodRequest) -> None:
        """Keep a pending pod's request for its bind (which names the pod only)."""
        if request.uid:
            self._requests[request.uid] = (request, self.clock())

    def request(self, uid: str) -> PodRequest | None:
        entry = self._requests.get(uid)
        return None if entry is None else entry[0]

    def forget(self, uid: str) -> None:
        self._requests.pop(uid, None)

    def forget_requests(self, keep: Iterable[str], *, before: float) -> None:
        """Drop remembered requests older than ``before`` whose pods a listing no longer shows."""
        kept = set(keep)
        for uid, (_, since) in list(self._requests.items()):
            if since < before and uid not in kept:
                del self._requests[uid]

    # --- inside -----------------------------------------------------------------------------------

    def _add(self, grant: Grant) -> None:
        self._grants[grant.uid] = grant
        self._by_node.setdefault(grant.node, {})[grant.uid] = grant
        self._dirty.add(grant.node)

    def _settle(self, now: float) -> None:
        """Bring dirty nodes up to date and retire the nodes whose heartbeat ran out."""
        if self._dirty:
            for name in self._dirty:
                self._refresh(name, now)
            self._dirty.clear()
        if now >= self._next_sweep:
            self._next_sweep = math.inf
            for name, node in self._nodes.items():
                if node.fresh_until < now:
                    self._index.close(name)
                elif node.problem is None:
                    self._next_sweep = min(self._next_sweep, node.fresh_until)

    def _refresh(self, name: NodeName, now: float) -> None:
        node = self._nodes.get(name)
        if node is None:
            return
        if node.report is None:
            node.views = ()
            self._index.update(name, (), takes_pods=False)
            return
        granted: Counter[CardUUID] = Counter()
        for grant in self._by_node.get(name, {}).values():
            for allocation in grant.allocations:
                granted[allocation.card] += allocation.granted_bytes + self.overhead_bytes
        node.views = tuple(
            placement.Card(
                node=name,
                uuid=card.uuid,
                index=card.index,
                capacity_bytes=grants.grantable_bytes(card.cuda_total_bytes, self._costs),
                granted_bytes=granted[card.uuid],
                free_bytes=card.free_bytes,
                healthy=card.healthy,
            )
            for card in node.report.cards
        )
        fresh = node.fresh_until >= now
        self._index.update(name, node.views, takes_pods=fresh)
        if fresh:
            self._next_sweep = min(self._next_sweep, node.fresh_until)

    def _node_failure(self, node: _Node | None, now: float) -> Failure | None:
        if node is None:
            return _UNKNOWN
        if node.problem is not None:
            return node.problem
        if node.fresh_until < now:
            return self._stale_failure
        return None

    def _single_failure(self, name: NodeName, cost: int, now: float) -> Failure:
        node = self._nodes.get(name)
        failure = self._node_failure(node, now)
        if failure is not None or node is None:
            return failure or _UNKNOWN
        _, misses = placement.split(node.views, cost)
        reason = (
            Reason.UNHEALTHY
            if node.views and not any(card.healthy for card in node.views)
            else Reason.NO_ROOM
        )
        return Failure(reason, placement.explain(misses, cost))

    def _multi_failure(
        self, name: NodeName, request: PodRequest, policy: placement.Policy, now: float
    ) -> Failure | None:
        node = self._nodes.get(name)
        failure = self._node_failure(node, now)
        if failure is not None or node is None:
            return failure
        try:
            self._place(node, request.demands, policy)
        except errors.NoFit as exc:
            return Failure(Reason.NO_ROOM, str(exc))
        return None

    def _multi_score(self, name: NodeName, request: PodRequest, policy: placement.Policy) -> int:
        node = self._nodes.get(name)
        if node is None:
            return 0
        try:
            placed = self._place(node, request.demands, policy)
        except errors.NoFit:
            return 0
        return round(sum(placement.score(fit, policy) for _, fit in placed) / len(placed))

    def _place(
        self, node: _Node, demands: Sequence[Demand], policy: placement.Policy
    ) -> list[tuple[Demand, placement.Fit]]:
        """A card for each demand, largest first, each seeing the ones placed before it."""
        views = list(node.views)
        chosen: dict[str, placement.Fit] = {}
        for demand in sorted(demands, key=lambda d: -d.bytes):
            fits, misses = placement.split(views, demand.bytes, overhead_bytes=self.overhead_bytes)
            fit = placement.best(fits, policy)
            if fit is None:
                raise errors.NoFit(placement.explain(misses, demand.bytes + self.overhead_bytes))
            chosen[demand.container] = fit
            position = views.index(fit.card)
            views[position] = dataclasses.replace(
                fit.card, granted_bytes=fit.card.granted_bytes + fit.cost_bytes
            )
        return [(demand, chosen[demand.container]) for demand in demands]


_UNKNOWN: Final = Failure(
    Reason.UNKNOWN_NODE, "node is unknown to the gpushare ledger (no Node object seen yet)"
)


def too_large(request: PodRequest, *, largest_card_bytes: int, overhead: int) -> Failure | None:
    """The failure for a request no card anywhere could hold, or ``None``."""
    if largest_card_bytes <= 0:
        return None
    for demand in request.demands:
        if demand.bytes + overhead > largest_card_bytes:
            extra = f" plus {format_bytes(overhead)} for its MPS server" if overhead else ""
            return Failure(
                Reason.TOO_LARGE,
                f"container {demand.container!r} asks for {format_bytes(demand.bytes)}{extra}"
                f" but the largest GPU in the cluster holds {format_bytes(largest_card_bytes)}",
            )
    return None
