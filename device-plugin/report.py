"""The node report: every card's memory and health in one Node annotation, written sparingly.

A report goes out when a card appears, goes or changes health, when a card's used memory has
moved by ``agent.report_change_bytes`` since the last report, or when ``agent.heartbeat_seconds``
have passed: a thousand idle nodes write one small patch a minute each.
"""

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from gpushare.core import names
from gpushare.core.config import Isolation
from gpushare.core.nodereport import CardReport, NodeReport
from gpushare.deviceplugin import kube
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)


def significant(
    old: NodeReport | None, cards: tuple[CardReport, ...], *, change_bytes: int
) -> bool:
    """Whether ``cards`` differ from the last report by more than used-memory noise."""
    if old is None or len(old.cards) != len(cards):
        return True
    for before, after in zip(old.cards, cards, strict=True):
        fixed = (
            "uuid",
            "index",
            "model",
            "total_bytes",
            "reserved_bytes",
            "healthy",
            "memory_limits",
        )
        if any(getattr(before, f) != getattr(after, f) for f in fixed):
            return True
        if abs(before.used_bytes - after.used_bytes) >= change_bytes:
            return True
    return False


class Reporter:
    """Writes the node report on change or heartbeat; remembers what it last wrote."""

    def __init__(
        self,
        api: kube.NodeApi,
        *,
        node: str,
        isolation: Isolation | None = None,
        change_bytes: int,
        heartbeat_seconds: float,
        on_sent: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._node = node
        self._isolation = isolation
        self._change = change_bytes
        self._heartbeat = heartbeat_seconds
        self._on_sent = on_sent
        self._clock = clock
        self._last: NodeReport | None = None
        self._last_at = 0.0

    @property
    def last(self) -> NodeReport | None:
        """The report last written."""
        return self._last

    async def offer(self, cards: Iterable[CardReport]) -> bool:
        """Write a report if due; returns whether one was written. API errors are logged."""
        ordered = tuple(sorted(cards, key=lambda c: (c.index, c.uuid)))
        now = self._clock()
        stale = self._last is None or now - self._last_at >= self._heartbeat
        if not stale and not significant(self._last, ordered, change_bytes=self._change):
            return False
        report = NodeReport(heartbeat=datetime.now(UTC), cards=ordered, isolation=self._isolation)
        try:
            await self._api.patch_node_annotations(
                self._node, {names.ANNOTATION_NODE_REPORT: report.encode()}
            )
        except ApiError as exc:
            logger.warning("node %s: cannot write the node report: %s", self._node, exc)
            return False
        self._last, self._last_at = report, now
        self._on_sent()
        return True
