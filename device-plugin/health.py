"""Card health with both transitions: a card that recovers is offered again.

A card is unhealthy while any reason holds: NVML cannot read it or no longer lists it, a critical
XID arrived less than :data:`XID_HOLD_SECONDS` ago, or the isolation it would be granted under is
down (an MPS mode whose daemon is not running: without one, the memory limit is silently ignored).
Each change of state is returned as a :class:`Transition` and logged once; the device list is
re-sent on each.
"""

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import nvml

logger = logging.getLogger(__name__)

XID_HOLD_SECONDS: Final = 300.0
"""A critical XID keeps its card out of new grants this long. Lasting faults (a card off the bus,
XID 79) also fail every NVML read and so stay unhealthy; transient ones (an ECC error the driver
corrected by retiring a page) clear, and five minutes of calm is the evidence we wait for."""


GONE: Final = "NVML no longer lists the card (off the bus, or the driver dropped it)"


@dataclass(frozen=True)
class Transition:
    """A card became healthy or unhealthy, and why."""

    card: CardUUID
    healthy: bool
    reason: str


@dataclass
class _Card:
    nvml_error: str | None = None
    xid: int | None = None
    xid_until: float = 0.0
    healthy: bool = True
    reason: str = "healthy"


class HealthTracker:
    """Folds NVML readings, XID events and isolation state into one healthy flag per card."""

    def __init__(
        self,
        *,
        xid_hold_seconds: float = XID_HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hold = xid_hold_seconds
        self._clock = clock
        self._cards: dict[CardUUID, _Card] = {}
        self._isolation_down: str | None = None
        self._nvml_down: str | None = None

    def healthy(self, card: CardUUID) -> bool:
        """Whether ``card`` may be granted now."""
        state = self._cards.get(card)
        return state is not None and state.healthy

    def reason(self, card: CardUUID) -> str:
        """Why ``card`` is unhealthy (or ``healthy``)."""
        state = self._cards.get(card)
        return "unknown card" if state is None else state.reason

    def cards(self) -> list[CardUUID]:
        """Every card seen so far."""
        return list(self._cards)

    def observe(self, snapshot: nvml.Snapshot) -> list[Transition]:
        """Take a poll's readings (and let expired XID holds lapse)."""
        self._nvml_down = snapshot.error
        listed = {reading.uuid for reading in snapshot.cards}
        if snapshot.error is None:
            for card, state in self._cards.items():
                if card not in listed:
                    state.nvml_error = GONE
        for reading in snapshot.cards:
            self._cards.setdefault(
                reading.uuid, _Card(healthy=False, reason="new")
            ).nvml_error = reading.error
        return self._settle()

    def xid(self, events: Iterable[nvml.XidEvent]) -> list[Transition]:
        """Take XID events; application XIDs leave the card alone."""
        now = self._clock()
        for event in events:
            if event.xid in nvml.APPLICATION_XIDS:
                logger.info(
                    "card %s: XID %d (an application's error), card stays healthy",
                    event.card,
                    event.xid,
                )
                continue
            state = self._cards.setdefault(event.card, _Card())
            state.xid = event.xid
            state.xid_until = now + self._hold
        return self._settle()

    def isolation(self, down_reason: str | None) -> list[Transition]:
        """Set or clear a node-wide reason (the MPS daemon is down)."""
        self._isolation_down = down_reason
        return self._settle()

    def _settle(self) -> list[Transition]:
        now = self._clock()
        changes = []
        for card, state in self._cards.items():
            reason = self._reason(state, now)
            healthy = reason is None
            text = reason or "healthy"
            if healthy != state.healthy:
                changes.append(Transition(card, healthy, text))
                log = logger.info if healthy else logger.warning
                log("card %s is now %s: %s", card, "healthy" if healthy else "unhealthy", text)
            state.healthy = healthy
            state.reason = text
        return changes

    def _reason(self, state: _Card, now: float) -> str | None:
        if self._nvml_down is not None:
            return self._nvml_down
        if state.nvml_error is not None:
            return f"NVML cannot read the card: {state.nvml_error}"
        if state.xid is not None and now < state.xid_until:
            return f"critical XID {state.xid}; held for {self._hold:.0f} s"
        if self._isolation_down is not None:
            return self._isolation_down
        return None
