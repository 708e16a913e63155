"""Prioritize: a score from 0 to 10 for each candidate node under the pod's policy.

``binpack`` (the default) scores a node by how full its best card would be after the grant, so
pods fill cards before opening new ones; ``spread`` scores the emptiest card highest. A pod picks
its own policy with the annotation :data:`gpushare.names.ANNOTATION_POLICY`. Nodes that cannot take
the pod score 0.
"""

from gpushare import config, errors
from gpushare.scheduler import demand, ledger, wire

__all__ = ["prioritize"]


def prioritize(book: ledger.Ledger, args: wire.ExtenderArgs, *, settings: config.Settings) -> bytes:
    """Answer one prioritize call (a ``HostPriorityList``, in the candidates' order).

    Raises :class:`BadRequest` when the call names no candidates.
    """
    names = args.candidates()
    try:
        request = demand.from_pod(args.pod, unit_bytes=settings.unit_bytes)
    except errors.BadRequest:
        return wire.encode_priorities(names, [0] * len(names))
    scores = book.scores(names, request, policy=request.policy or settings.policy)
    return wire.encode_priorities(names, scores)
