"""What the webhook knows of the cluster's cards: the largest card each node's agent reports.

A card's size here is its CUDA total (NVML's total less the driver's reserved part): what grants
and vLLM can use, 79.18 GiB of an H100's 79.65 GiB.
"""

import logging

from gpushare.core import errors, nodereport
from gpushare.core.ids import NodeName

logger = logging.getLogger(__name__)


class Cards:
    """The largest CUDA total per reporting node, fed by the Node watch."""

    def __init__(self) -> None:
        self._largest: dict[NodeName, int] = {}

    def update(self, node: NodeName, report: str | None) -> None:
        """Record a node's report annotation (``None`` or unreadable: the node reports nothing)."""
        if report is None:
            self._largest.pop(node, None)
            return
        try:
            decoded = nodereport.decode(report)
        except errors.BadRequest as exc:
            logger.warning("node %s: ignoring its report: %s", node, exc)
            self._largest.pop(node, None)
            return
        if decoded.cards:
            self._largest[node] = max(card.cuda_total_bytes for card in decoded.cards)
        else:
            self._largest.pop(node, None)

    def forget(self, node: NodeName) -> None:
        """A node was deleted."""
        self._largest.pop(node, None)

    def largest(self) -> int | None:
        """The largest CUDA total any node reports, or ``None`` while no node reports a card."""
        return max(self._largest.values(), default=None)

    def nodes(self) -> int:
        """How many nodes report cards."""
        return len(self._largest)
