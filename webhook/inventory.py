"""What the webhook knows of the cluster's cards: the largest card each node's agent reports."""

import logging

from gpushare import errors, nodereport
from gpushare.ids import NodeName

logger = logging.getLogger(__name__)


class Cards:
    """The largest card per reporting node, fed by the Node watch."""

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
            self._largest[node] = max(card.total_bytes for card in decoded.cards)
        else:
            self._largest.pop(node, None)

    def forget(self, node: NodeName) -> None:
        """A node was deleted."""
        self._largest.pop(node, None)

    def largest(self) -> int | None:
        """The largest card any node reports, or ``None`` while no node reports one."""
        return max(self._largest.values(), default=None)

    def nodes(self) -> int:
        """How many nodes report cards."""
        return len(self._largest)
