"""Prioritize: a score from 0 to 10 for each candidate node under the pod's policy.

``binpack`` (the default) scores a node by how full its best card would be after the grant, so
pods fill cards before opening new ones; ``spread`` scores the emptiest card highest. A pod picks
its own policy with the annotation :data:`gpushare.names.ANNOTATION_POLICY`. Nodes that cannot take
the pod score 0.
"""

from gpushare import config, errors
from gpushare.ids import NodeName
from gpushare.scheduler import demand, ledger, wire

__all__ = ["prioritize"]


def prioritize(
    book: ledger.Ledger, args: wire.ExtenderArgs, *, settings: config.Settings
) -> list[wire.HostPriority]:
    """Answer one prioritize call; raises :class:`BadRequest` when it names no candidates."""
    names = args.candidates()
    try:
        request = demand.from_pod(args.pod, unit_bytes=settings.unit_bytes)
    except errors.BadRequest:
        return [{"Host": name, "Score": 0} for name in names]
    policy = request.policy or settings.policy
    score = book.score
    return [
        {"Host": name, "Score": score(NodeName(name), request, policy=policy)} for name in names
    ]
