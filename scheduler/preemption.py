"""Preempt: kube-scheduler's victims checked against card memory, and chosen again on one card.

kube-scheduler's default preemption (``pkg/scheduler/framework/preemption`` and the
``DefaultPreemption`` plugin) picks, per node, the pods below the preemptor's priority whose
removal lets its in-tree filters pass: for ``gpushare.io/gpu-memory`` that is the node's total
(``NodeResourcesFit``, which counts the resource unless it is ``ignoredByScheduler``), never one
card. It then sends each node's victims to the extender's ``preemptVerb`` and takes the answer as
the candidates (``Evaluator.callExtenders``): a node left out is no longer a candidate; a node's
victims are replaced by those returned, which may be any pod kube-scheduler's cache holds on that
node (a UID it does not know, or a node with no victims, fails the whole preemption); the answer's
``NumPDBViolations`` is taken as it is. The node among the candidates is then chosen by
kube-scheduler (fewest PDB violations, lowest highest victim priority, and so on).

So, per node, this module keeps only victims that leave one card with room for the pod. For a pod
with one memory-requesting container it chooses them again, on one card, from the pods holding
memory there below the preemptor's priority: the fewest pods, then the lowest highest priority,
then the lowest priorities in sum, then the least memory freed. With the fewest pods, each victim
is needed: none could stay. Victims kube-scheduler chose that hold no memory on the node (its
reasons are CPU, memory or pod count) stay victims. A node where no such choice exists is left
out, even when kube-scheduler's victims would free its total: the pod would not fit on any card.
For a pod with several memory-requesting containers, kube-scheduler's victims stand if all its
containers then fit, and the node is left out otherwise. PDBs are not read here:
``NumPDBViolations`` is passed on as kube-scheduler counted it for its own victims.
"""

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from gpushare.core import errors, placement
from gpushare.core.ids import CardUUID, NodeName
from gpushare.scheduler import demand, ledger, wire

__all__ = ["Choice", "Holder", "choose_on_card", "parse", "preempt"]

logger = logging.getLogger(__name__)

MAX_HOLDERS: Final = 12
"""Holders per card searched exhaustively (4,096 subsets at most); beyond, the lowest-priority
and then largest ones: a card of 80 GiB rarely holds more than a dozen vLLM servers."""


@dataclass(frozen=True, slots=True)
class Holder:
    """A pod holding memory on a card: what evicting it frees there, and its priority."""

    uid: str
    priority: int
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class Choice:
    """Victims on one card, and what they free there."""

    card: placement.Card
    victims: tuple[Holder, ...]

    def key(self) -> tuple[int, int, int, int, str, int]:
        """Fewest victims, lowest highest priority, lowest sum, least freed; then the card."""
        return (
            len(self.victims),
            max(h.priority for h in self.victims),
            sum(h.priority for h in self.victims),
            sum(h.freed_bytes for h in self.victims),
            self.card.node,
            self.card.index,
        )


def choose_on_card(
    card: placement.Card, holders: Iterable[Holder], cost_bytes: int
) -> Choice | None:
    """The best victims among ``holders`` that leave ``card`` room for ``cost_bytes``, or None.

    ``holders`` are the pods that may be evicted (all below the preemptor's priority).
    """
    if not card.healthy:
        return None
    # Memory used outside every grant stays used: only the victims' grants come back.
    need = cost_bytes - (card.capacity_bytes - card.granted_bytes - card.foreign_bytes)
    if need <= 0:
        return None  # the card has room already: no victim of it is needed
    pool = sorted(holders, key=lambda h: (h.priority, -h.freed_bytes, h.uid))[:MAX_HOLDERS]
    if sum(h.freed_bytes for h in pool) < need:
        return None
    for count in range(1, len(pool) + 1):
        found = [
            Choice(card, combo)
            for combo in itertools.combinations(pool, count)
            if sum(h.freed_bytes for h in combo) >= need
        ]
        if found:
            return min(found, key=Choice.key)
    return None


def preempt(
    book: ledger.Ledger,
    args: wire.ExtenderPreemptionArgs,
    *,
    unit_bytes: int,
    outcomes: Counter[str] | None = None,
) -> wire.ExtenderPreemptionResult:
    """Answer one ``preempt`` call: per node, victims that free one card, or no entry.

    ``outcomes`` counts the nodes ``kept`` (kube-scheduler's victims stand), ``chosen`` (others
    on one card) and ``refused``.
    """
    counted: Counter[str] = Counter() if outcomes is None else outcomes
    request = demand.from_pod(args.pod, unit_bytes=unit_bytes)
    answer: dict[str, wire.MetaVictims] = {}
    for name, proposed in args.victims().items():
        node = NodeName(name)
        uids = [pod.uid for pod in proposed.pods]
        chosen = _victims(book, node, request, uids)
        if chosen is None:
            counted["refused"] += 1
            logger.info(
                "preempt %s: node %s refused: no card there frees enough for the pod",
                request.key, name,
            )
            continue
        if set(chosen) != set(uids):
            counted["chosen"] += 1
            logger.info(
                "preempt %s: node %s: victims %s instead of kube-scheduler's %s",
                request.key, name, chosen, uids,
            )
        else:
            counted["kept"] += 1
        answer[name] = wire.MetaVictims(
            pods=[wire.MetaPod(uid=uid) for uid in chosen],
            num_pdb_violations=proposed.num_pdb_violations,
        )
    return wire.ExtenderPreemptionResult(node_name_to_meta_victims=answer)


def _victims(
    book: ledger.Ledger, node: NodeName, request: demand.PodRequest, proposed: Sequence[str]
) -> list[str] | None:
    """The UIDs to evict on ``node`` so that the pod fits one card, or None."""
    grants = {grant.uid: grant for grant in book.grants_on(node)}
    others = [uid for uid in proposed if uid not in grants]  # kube-scheduler's own reasons
    cards = book.node_cards(node)
    if not cards or not request.demands:
        return None
    if len(request.demands) > 1:
        freed = [grants[uid] for uid in proposed if uid in grants]
        return list(proposed) if _fits_after(cards, freed, request, book.overhead_bytes) else None
    cost = request.demands[0].bytes + book.overhead_bytes
    if any(card.healthy and card.room_bytes >= cost for card in cards):
        # A card has room: kube-scheduler's victims serve its node totals, and free no card.
        return list(proposed)
    # Only pods that kube-scheduler's cache shows on the node (bound or observed) may be named.
    eligible = [
        grant for grant in grants.values()
        if grant.priority < request.priority and grant.state != "reserved"
    ]
    choices = [
        choice
        for card in cards
        if (choice := choose_on_card(card, _holders(card.uuid, eligible, book), cost)) is not None
    ]
    if not choices:
        return None
    best = min(choices, key=Choice.key)
    return others + [holder.uid for holder in best.victims]


def _holders(
    card: CardUUID, grants: Iterable[ledger.Grant], book: ledger.Ledger
) -> list[Holder]:
    holders = []
    for grant in grants:
        freed = sum(
            allocation.granted_bytes + book.overhead_bytes
            for allocation in grant.allocations
            if allocation.card == card
        )
        if freed:
            holders.append(Holder(grant.uid, grant.priority, freed))
    return holders


def _fits_after(
    cards: Sequence[placement.Card],
    evicted: Iterable[ledger.Grant],
    request: demand.PodRequest,
    overhead: int,
) -> bool:
    """Whether every container of the pod finds a card once ``evicted`` are gone."""
    freed: dict[CardUUID, int] = {}
    for grant in evicted:
        for allocation in grant.allocations:
            freed[allocation.card] = freed.get(allocation.card, 0) + (
                allocation.granted_bytes + overhead
            )
    views = []
    for card in cards:
        back = freed.get(card.uuid, 0)
        # The agent's free memory grows by what the victims held; foreign use stays.
        free = None if card.free_bytes is None else card.free_bytes + back
        views.append(
            dataclasses.replace(card, granted_bytes=card.granted_bytes - back, free_bytes=free)
        )
    for item in sorted(request.demands, key=lambda d: -d.bytes):
        fits, _ = placement.split(views, item.bytes, overhead_bytes=overhead)
        fit = placement.best(fits, "fill")
        if fit is None:
            return False
        position = views.index(fit.card)
        views[position] = dataclasses.replace(
            fit.card, granted_bytes=fit.card.granted_bytes + fit.cost_bytes
        )
    return True


def parse(body: bytes) -> wire.ExtenderPreemptionArgs:
    """A ``preempt`` call's arguments; raises :class:`BadRequest` naming a bad field."""
    args = wire.parse(wire.ExtenderPreemptionArgs, body)
    if not args.pod.metadata.uid:
        raise errors.BadRequest("ExtenderPreemptionArgs: Pod.metadata.uid is empty")
    return args
