"""Filter: which of the candidate nodes can give the pod a card, and why the others cannot.

A node passes when one healthy card, on a node whose agent reported recently, has room for each
container's grant plus its per-allocation overhead, and the agent's free memory agrees (see
:attr:`gpushare.core.placement.Card.room_bytes`). A pod that is malformed, or larger than any
card in the cluster, fails every node as unresolvable: preemption cannot help it.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Final

from gpushare.core import config, errors
from gpushare.scheduler import demand, ledger, wire
from gpushare.scheduler.candidates import Candidates

__all__ = ["ROLLOUT_HINT", "Outcome", "filter_nodes"]

ROLLOUT_HINT: Final = (
    " (a rollout: the previous revision still holds its grant; maxSurge: 0 replaces pods in"
    " place, see docs/install.md, Rollouts)"
)
"""Added to each node's reason when the pod's Deployment is rolling out and no card has room:
kube-scheduler's FailedScheduling Event then names the setting that lets the rollout finish."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer, and how many nodes failed for each reason (for the metrics)."""

    passed: Candidates
    failed: dict[str, str]
    unresolvable: dict[str, str]
    failures: Counter[ledger.Reason]

    def encode(self, args: wire.ExtenderArgs) -> bytes:
        """The ``ExtenderFilterResult`` in the form the call came in."""
        if args.nodes is None:
            return wire.encode_filter_names(self.passed, self.failed, self.unresolvable)
        keep = set(self.passed.names)
        kept = [item for item in args.nodes.items if item["metadata"]["name"] in keep]
        result = wire.ExtenderFilterResult.model_construct(
            nodes={"metadata": {}, "items": kept},
            node_names=None,
            failed_nodes=self.failed,
            failed_and_unresolvable_nodes=self.unresolvable,
            error="",
        )
        return wire.encode(result)


def filter_nodes(
    book: ledger.Ledger,
    args: wire.ExtenderArgs,
    candidates: Candidates,
    *,
    settings: config.Settings,
) -> Outcome:
    """Answer one filter call about ``candidates`` (the call's nodes)."""
    try:
        request = demand.from_pod(args.pod, unit_bytes=settings.unit_bytes)
    except errors.BadRequest as exc:
        return _unresolvable(candidates, ledger.Failure(ledger.Reason.BAD_REQUEST, str(exc)))
    if not request.demands:
        return Outcome(candidates, {}, {}, Counter())
    book.remember(request)
    too_large = ledger.too_large(
        request, largest_card_bytes=book.largest_card_bytes(), overhead=book.overhead_bytes
    )
    if too_large is not None:
        return _unresolvable(candidates, too_large)
    passed, failed = book.split(candidates, request, policy=request.policy or settings.policy)
    messages = {name: f.message for name, f in failed.items()}
    if (
        not passed.names
        and failed
        and all(f.reason == ledger.Reason.NO_ROOM for f in failed.values())
        and book.other_revision_holds(request)
    ):
        messages = {name: message + ROLLOUT_HINT for name, message in messages.items()}
    return Outcome(passed, messages, {}, Counter(f.reason for f in failed.values()))


def _unresolvable(candidates: Candidates, failure: ledger.Failure) -> Outcome:
    return Outcome(
        Candidates([]),
        {},
        dict.fromkeys(candidates.names, failure.message),
        Counter({failure.reason: len(candidates)}),
    )
