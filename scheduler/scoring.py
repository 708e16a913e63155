"""Prioritize: a score from 0 to 10 for each candidate node under the pod's policy.

``fill`` (the default) scores a node whose best card already holds grants above any node that
would have to open an empty card, and within each the fuller share of the card higher, so pods
fill the cards in use before opening new ones, and a new card is the smallest that fits;
``binpack`` scores by the share filled of the card with the fewest bytes left; ``spread`` scores
the emptiest card highest (see :mod:`gpushare.core.placement`). A pod picks
its own policy with the annotation :data:`gpushare.core.names.ANNOTATION_POLICY`. Nodes that
cannot take the pod score 0.
"""

import numpy as np

from gpushare.core import config, errors
from gpushare.scheduler import demand, ledger, wire
from gpushare.scheduler.candidates import Candidates
from gpushare.scheduler.priorities import PriorityLists

__all__ = ["prioritize"]


def prioritize(
    book: ledger.Ledger,
    args: wire.ExtenderArgs,
    candidates: Candidates,
    *,
    settings: config.Settings,
    answers: PriorityLists,
) -> bytes:
    """Answer one prioritize call about ``candidates``: a ``HostPriorityList`` in their order."""
    try:
        request = demand.from_pod(args.pod, unit_bytes=settings.unit_bytes)
    except errors.BadRequest:
        zeros = np.zeros(len(candidates), dtype=np.int8)
        return answers.write(candidates, zeros, policy=settings.policy, key=0)
    policy = request.policy or settings.policy
    scores = book.scores(candidates, request, policy=policy)
    return answers.write(candidates, scores, policy=policy, key=request.total_bytes)
