"""The node's ResourceSlice: its healthy cards as shareable devices, rewritten when they change.

The slice is written by server-side apply whenever the offered devices change (a card appears,
goes, or changes health), never for used-memory noise: kube-scheduler's allocator, not the
agent, accounts for what claims consume. The pool's generation starts at the agent's start time
in seconds and grows by one per change, so it keeps growing across restarts as the API asks.
The slice stays when the agent stops, so a restart does not take the node's cards away from new
claims for long; handing the node to the extender backend means deleting it (docs/install.md).

kubelet deletes every ResourceSlice of its node when it starts, and a driver's slices 30 s after
the driver unregisters for good. So the slice is also written again, unchanged, when kubelet
registers the plugin (:meth:`Publisher.forget`: a restarted kubelet may just have wiped it) and
every :data:`RESYNC_SECONDS` (a wipe that came after that registration, or any other deletion).
"""

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from gpushare.core import dra, errors, names
from gpushare.core.config import Settings
from gpushare.core.nodereport import CardReport
from gpushare.deviceplugin.dra.kube import DraApi
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)

RESYNC_SECONDS: Final = 30.0
"""How often an unchanged slice is written again (server-side apply: a no-op while it exists)."""


class Publisher:
    """Keeps one node's ResourceSlice equal to its offered cards."""

    def __init__(
        self,
        api: DraApi,
        *,
        node: str,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._node = node
        self._unit = settings.unit_bytes
        self._overhead = settings.allocation_overhead_bytes
        self._clock = clock
        self._generation = int(clock())
        self._last: list[Any] | None = None
        self._written_at = 0.0
        self._stale = False

    @property
    def name(self) -> str:
        """The slice's name."""
        return dra.slice_name(self._node)

    @property
    def published(self) -> bool:
        """Whether the slice is written as last offered."""
        return self._last is not None

    def forget(self) -> None:
        """The slice may be gone (kubelet registered the plugin again): write it next offer."""
        self._stale = True

    async def offer(self, cards: Iterable[CardReport]) -> bool:
        """Write the slice if its devices changed, or it may be gone, or it is due a resync;
        returns whether it was written."""
        offered = list(cards)
        devices = self._body(offered, self._generation)["spec"]["devices"]
        changed = devices != self._last
        now = self._clock()
        if not changed and not self._stale and now - self._written_at < RESYNC_SECONDS:
            return False
        generation = self._generation + 1 if changed else self._generation
        try:
            await self._api.apply_slice(self._body(offered, generation))
        except ApiError as exc:
            logger.warning("node %s: cannot write ResourceSlice %s: %s", self._node, self.name, exc)
            return False
        self._written_at, self._stale = now, False
        if changed:
            self._generation, self._last = generation, devices
            logger.info(
                "node %s: ResourceSlice %s offers %d card(s), generation %d",
                self._node,
                self.name,
                len(devices),
                generation,
            )
        return True

    def _body(self, cards: list[CardReport], generation: int) -> dict[str, Any]:
        return dra.resource_slice(
            self._node,
            cards,
            generation=generation,
            unit_bytes=self._unit,
            overhead_bytes=self._overhead,
        )


async def check_exclusive(api: DraApi, *, node: str, backend: str) -> None:
    """Refuse to serve a node that the other backend serves: both would grant the same cards.

    Raises :class:`ConfigError` naming the other backend's trace and how to clear it.
    """
    if backend == "dra":
        units = await api.gpu_memory_allocatable(node)
        if units > 0:
            raise errors.ConfigError(
                f"node {node} offers {units} {names.RESOURCE_GPU_MEMORY} units from the extender"
                " backend's device plugin, and both backends would grant the same cards: drain"
                " the node and stop that device plugin (or set backend: extender) before"
                " starting the DRA backend here"
            )
    elif await api.slice_exists(dra.slice_name(node)):
        raise errors.ConfigError(
            f"node {node} has ResourceSlice {dra.slice_name(node)} of the DRA backend, and both"
            " backends would grant the same cards: drain the node, stop the DRA agent and delete"
            " that slice (or set backend: dra) before starting the extender backend's device"
            " plugin here"
        )
