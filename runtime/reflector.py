"""The one list-and-watch loop of every part, as client-go's reflector runs it.

List (the source replaces its store), then watch from the list's resource version; a watch that
ends is resumed from the last version it saw; ``410 Gone`` (the version is too old) lists again at
once; any other API failure waits with a jittered exponential backoff and tries again. The source
says how to list and how to watch (which objects, into what store); this loop says when.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final

from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)

WATCH_SECONDS: Final = 300
"""Server-side length of one watch request, before jitter (client-go picks 5 to 10 minutes)."""
BACKOFF: Final = (0.2, 30.0)
"""First and longest wait after a failed list or watch."""

List = Callable[[], Awaitable[str]]
"""Lists into the store; returns the list's resource version."""
Watch = Callable[[str, int], Awaitable[str]]
"""Watches from a version for about that many seconds, applying events to the store; returns the
last version seen. Raises :class:`Expired` (or an :class:`ApiError` with status 410) when the
version is gone."""


class Expired(Exception):
    """The watch's resource version is too old: list again."""


def watch_seconds(base: int = WATCH_SECONDS) -> int:
    """One watch's length: ``base`` plus up to a fifth, so that watches do not renew together."""
    return int(base * random.uniform(1.0, 1.2))


def backoff_seconds(failures: int, backoff: tuple[float, float] = BACKOFF) -> float:
    """The wait after ``failures`` failures in a row (at least one): doubling, capped, jittered."""
    first, most = backoff
    doubled: float = first * 2.0 ** min(failures - 1, 16)
    return min(most, doubled) * random.uniform(0.5, 1.0)


class Reflector:
    """Runs ``list_`` and ``watch`` for one resource until cancelled; :attr:`synced` is set once
    the first list is in. ``restarted`` hears why each watch ended: ``end`` (the server closed
    it; resumed), ``expired`` (listed again) or ``error`` (after a backoff)."""

    def __init__(
        self,
        name: str,
        list_: List,
        watch: Watch,
        *,
        restarted: Callable[[str], object] = lambda reason: None,
        seconds: int = WATCH_SECONDS,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.name = name
        self._list = list_
        self._watch = watch
        self._restarted = restarted
        self._seconds = seconds
        self._backoff = backoff
        self.synced = asyncio.Event()

    async def run(self) -> None:
        version = ""
        failures = 0
        while True:
            try:
                if not version:
                    version = await self._list()
                    self.synced.set()
                version = await self._watch(version, watch_seconds(self._seconds))
                failures = 0
                self._restarted("end")
            except Expired:
                logger.info("%s: version %s expired; listing again", self.name, version)
                self._restarted("expired")
                version = ""
            except ApiError as exc:
                if exc.status == 410:
                    logger.info("%s: version %s expired; listing again", self.name, version)
                    self._restarted("expired")
                    version = ""
                    continue
                failures += 1
                delay = backoff_seconds(failures, self._backoff)
                logger.warning("%s: %s; retrying in %.1f s", self.name, exc, delay)
                self._restarted("error")
                await asyncio.sleep(delay)
