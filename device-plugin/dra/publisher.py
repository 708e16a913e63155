"""The node's ResourceSlice: its healthy cards as shareable devices, rewritten when they change.

The slice is written by server-side apply whenever the offered devices change (a card appears,
goes, or changes health), never for used-memory noise: kube-scheduler's allocator, not the
agent, accounts for what claims consume. The pool's generation starts at the agent's start time
in seconds and grows by one per change, so it keeps growing across restarts as the API asks.
The slice stays when the agent stops, so a restart does not take the node's cards away from new
claims for long; handing the node to the extender backend means deleting it (docs/install.md).
"""

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from gpushare.core import dra, errors, names
from gpushare.core.config import Settings
from gpushare.core.nodereport import CardReport
from gpushare.deviceplugin.dra.kube import DraApi
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)


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
        self._generation = int(clock())
        self._last: list[Any] | None = None

    @property
    def name(self) -> str:
        """The slice's name."""
        return dra.slice_name(self._node)

    @property
    def published(self) -> bool:
        """Whether the slice is written as last offered."""
        return self._last is not None

    async def offer(self, cards: Iterable[CardReport]) -> bool:
        """Write the slice if its devices changed; returns whether it was written."""
        body = dra.resource_slice(
            self._node,
            list(cards),
            generation=self._generation + 1,
            unit_bytes=self._unit,
            overhead_bytes=self._overhead,
        )
        devices = body["spec"]["devices"]
        if devices == self._last:
            return False
        try:
            await self._api.apply_slice(body)
        except ApiError as exc:
            logger.warning("node %s: cannot write ResourceSlice %s: %s", self._node, self.name, exc)
            return False
        self._generation += 1
        self._last = devices
        logger.info(
            "node %s: ResourceSlice %s offers %d card(s), generation %d",
            self._node,
            self.name,
            len(devices),
            self._generation,
        )
        return True


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
