"""The watchdog: per-container GPU memory against the grant, with an Event past a grace period.

NVML lists the processes on each card; each process is traced to its pod and container through its
cgroup (``/proc/<pid>/cgroup`` names the pod UID and the runtime's container ID), and kubelet's
PodResources gives the container's grant. Use is summed per container, so a container that runs
several CUDA processes (each under the daemon's per-process cap) is still held to its grant here.
"""

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from gpushare.core import quantities
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin import kube
from gpushare.deviceplugin.nvml import ProcessUsage
from gpushare.deviceplugin.pods import PodInfo
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)

REASON: Final = "GpuMemoryOverGrant"
EVICT_REASON: Final = "GpuMemoryOverGrantEvicted"

# cgroup v1: .../kubepods/burstable/pod<uid>/<id>; v2 with systemd:
# .../kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope (or crio-, docker-).
_POD: Final = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER: Final = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class Location:
    """Where a process runs: its pod's UID, its container's runtime ID and its cgroup's path."""

    pod_uid: str
    container_id: str
    cgroup: str = ""
    """The path of the process's cgroup below the hierarchy's root (as ``/proc/<pid>/cgroup``)."""


class ProcessLocator(Protocol):
    """Finds the pod and container of a process (a seam: the simulator places its own)."""

    def locate(self, pid: int) -> Location | None:
        """The process's location, or ``None`` outside any pod."""
        ...


class CgroupLocator:
    """Reads ``<proc_root>/<pid>/cgroup`` (the agent runs with the host's PID namespace)."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._root = proc_root

    def locate(self, pid: int) -> Location | None:
        """Parse the process's cgroup paths."""
        try:
            text = (self._root / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        return parse_cgroup(text)


class PollLocator:
    """One poll's view of ``inner``: each process is located once, however many checks ask."""

    def __init__(self, inner: ProcessLocator) -> None:
        self._inner = inner
        self._seen: dict[int, Location | None] = {}

    def locate(self, pid: int) -> Location | None:
        """``inner``'s answer, read on the first question about ``pid``."""
        if pid not in self._seen:
            self._seen[pid] = self._inner.locate(pid)
        return self._seen[pid]


def parse_cgroup(text: str) -> Location | None:
    """The pod UID and container ID in a ``/proc/<pid>/cgroup`` text, cgroup v1 or v2."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1].rstrip("/")
        pod = _POD.search(path)
        container = _CONTAINER.search(path)
        if pod and container:
            return Location(pod.group(1).replace("_", "-"), container.group(1), path)
    return None


@dataclass(frozen=True)
class ContainerUsage:
    """One container's use of its card against its grant."""

    pod: PodInfo
    container: str
    card: CardUUID
    used_bytes: int
    granted_bytes: int

    @property
    def key(self) -> str:
        """``namespace/pod/container``."""
        return f"{self.pod.key}/{self.container}"

    @property
    def over(self) -> bool:
        """Using more than granted."""
        return self.used_bytes > self.granted_bytes


def usage(
    processes: Iterable[ProcessUsage],
    *,
    locator: ProcessLocator,
    pods: Iterable[PodInfo],
    grants: Mapping[tuple[PodKey, str], tuple[CardUUID, int]],
) -> list[ContainerUsage]:
    """Sum process use per container; ``grants`` maps (pod key, container) to (card, bytes)."""
    pod_list = list(pods)
    by_uid = {pod.uid: pod for pod in pod_list if pod.uid}
    by_key = {pod.key: pod for pod in pod_list}
    used: dict[tuple[PodKey, str], int] = {key: 0 for key in grants if key[0] in by_key}
    for process in processes:
        where = locator.locate(process.pid)
        pod = by_uid.get(where.pod_uid) if where is not None else None
        container = pod.container_ids.get(where.container_id) if pod and where else None
        if pod is not None and container is not None:
            key = (pod.key, container)
            used[key] = used.get(key, 0) + process.used_bytes
    result = []
    for (pod_key, container), used_bytes in used.items():
        card, granted = grants.get((pod_key, container), (CardUUID(""), 0))
        result.append(ContainerUsage(by_key[pod_key], container, card, used_bytes, granted))
    return result


class Watchdog:
    """Raises an Event (and under ``evict`` an eviction) once per episode of over-use past grace."""

    def __init__(
        self,
        api: kube.NodeApi | None,
        *,
        node: str,
        grace_seconds: float,
        action: Literal["event", "evict"],
        on_violation: Callable[[ContainerUsage], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._node = node
        self._grace = grace_seconds
        self._action = action
        self._on_violation = on_violation
        self._clock = clock
        self._over_since: dict[str, float] = {}
        self._reported: set[str] = set()

    async def check(self, usages: Iterable[ContainerUsage]) -> list[ContainerUsage]:
        """Act on containers over their grant past the grace; returns those acted on now."""
        now = self._clock()
        seen = set()
        acted = []
        for item in usages:
            if not item.over or item.granted_bytes <= 0:
                continue
            seen.add(item.key)
            since = self._over_since.setdefault(item.key, now)
            if now - since < self._grace or item.key in self._reported:
                continue
            self._reported.add(item.key)
            acted.append(item)
            self._on_violation(item)
            await self._act(item, now - since)
        for key in set(self._over_since) - seen:
            del self._over_since[key]
            self._reported.discard(key)
        return acted

    async def _act(self, item: ContainerUsage, seconds: float) -> None:
        message = (
            f"container {item.container} uses {quantities.format_bytes(item.used_bytes)} of card"
            f" {item.card}, over its grant of {quantities.format_bytes(item.granted_bytes)} for"
            f" {seconds:.0f} s"
        )
        logger.warning("pod %s: %s", item.pod.key, message)
        if self._api is None:
            return
        try:
            if self._action == "evict":
                await self._api.evict(item.pod.namespace, item.pod.name)
                await self._api.post_event(
                    item.pod, reason=EVICT_REASON, message=f"evicted: {message}", node=self._node
                )
            else:
                await self._api.post_event(
                    item.pod, reason=REASON, message=message, node=self._node
                )
        except ApiError as exc:
            logger.warning("pod %s: cannot report over-use: %s", item.pod.key, exc)
