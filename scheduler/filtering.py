"""Filter: which of the candidate nodes can give the pod a card, and why the others cannot.

A node passes when one healthy card, on a node whose agent reported recently, has room for each
container's grant plus its per-allocation overhead, and the agent's free memory agrees (see
:attr:`gpushare.placement.Card.room_bytes`). A pod that is malformed, or larger than any card in
the cluster, fails every node as unresolvable: preemption cannot help it.
"""

from collections import Counter
from dataclasses import dataclass

from gpushare import config, errors
from gpushare.scheduler import demand, ledger, wire

__all__ = ["Outcome", "filter_nodes"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer, and how many nodes failed for each reason (for the metrics)."""

    result: wire.ExtenderFilterResult
    failures: Counter[ledger.Reason]


def filter_nodes(
    book: ledger.Ledger, args: wire.ExtenderArgs, *, settings: config.Settings
) -> Outcome:
    """Answer one filter call; raises :class:`BadRequest` when the call names no candidates."""
    names = args.candidates()
    try:
        request = demand.from_pod(args.pod, unit_bytes=settings.unit_bytes)
    except errors.BadRequest as exc:
        return _unresolvable(args, names, ledger.Failure(ledger.Reason.BAD_REQUEST, str(exc)))
    if not request.demands:
        return _answer(args, names, {}, {})
    book.remember(request)
    too_large = ledger.too_large(
        request, largest_card_bytes=book.largest_card_bytes(), overhead=book.overhead_bytes
    )
    if too_large is not None:
        return _unresolvable(args, names, too_large)
    passed, failed = book.split(names, request, policy=request.policy or settings.policy)
    return _answer(
        args,
        passed,
        {name: f.message for name, f in failed.items()},
        {},
        failures=Counter(f.reason for f in failed.values()),
    )


def _unresolvable(args: wire.ExtenderArgs, names: list[str], failure: ledger.Failure) -> Outcome:
    return _answer(
        args,
        [],
        {},
        dict.fromkeys(names, failure.message),
        failures=Counter({failure.reason: len(names)}),
    )


def _answer(
    args: wire.ExtenderArgs,
    passed: list[str],
    failed: dict[str, str],
    unresolvable: dict[str, str],
    *,
    failures: Counter[ledger.Reason] | None = None,
) -> Outcome:
    if args.node_names is not None:
        result = wire.ExtenderFilterResult.model_construct(
            nodes=None,
            node_names=passed,
            failed_nodes=failed,
            failed_and_unresolvable_nodes=unresolvable,
            error="",
        )
    else:
        keep = set(passed)
        items = args.nodes.items if args.nodes is not None else []
        kept = [item for item in items if item["metadata"]["name"] in keep]
        result = wire.ExtenderFilterResult.model_construct(
            nodes={"metadata": {}, "items": kept},
            node_names=None,
            failed_nodes=failed,
            failed_and_unresolvable_nodes=unresolvable,
            error="",
        )
    return Outcome(result, failures or Counter())
