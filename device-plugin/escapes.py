"""Escapes: a granted container that leaves its isolation is caught on the poll that sees it.

The watchdog (:mod:`.watchdog`) judges a container's summed use against its grant, after a grace.
This module judges *how* each process of a granted pod holds its card, which needs no grace: under
``mps`` and ``mps-shared`` every process of such a pod must be a client of an MPS server, so

``outside-mps``
    a plain CUDA context (NVML lists it among compute processes but not among MPS clients): the
    process dropped or redirected ``CUDA_MPS_PIPE_DIRECTORY`` and CUDA opened the card directly,
    outside any MPS limit;
``own-mps-daemon``
    an ``nvidia-cuda-mps-server`` inside the pod: it started an MPS control daemon of its own, whose
    clients NVML lists as MPS clients like any other;
``over-limit``
    one MPS client holding more than its container's grant (plus ``agent.escape_slack_bytes``): its
    limit did not hold (a limit variable naming a GPU it cannot see, or raised under
    ``mps-shared``). Under ``cgroup`` the same test applies to the container's sum, which the
    driver's per-cgroup limit covers as a whole.

Each finding gets a Warning Event on the pod naming the container, once per episode, and under
``agent.escape_action: evict`` (the default) an eviction. Pods that hold no grant are not judged:
their processes are not gpushare's to place (see docs/isolation.md for what that leaves open).
"""

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from gpushare.core import config, quantities
from gpushare.core.config import Isolation
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin import kube
from gpushare.deviceplugin.nvml import ProcessUsage
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.watchdog import ProcessLocator
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)

Escape = Literal["outside-mps", "own-mps-daemon", "over-limit"]

REASON: Final = "GpuIsolationEscape"
"""The Event's reason (``kubectl describe pod`` shows it)."""

_WHAT: Final[Mapping[Escape, str]] = {
    "outside-mps": "holds a CUDA context outside its MPS daemon (no memory limit applies)",
    "own-mps-daemon": "runs an MPS server of its own (its clients escape the grant)",
    "over-limit": "holds more than its grant: its memory limit did not hold",
}


@dataclass(frozen=True)
class Finding:
    """One container caught leaving its isolation one way."""

    pod: PodInfo
    container: str
    card: CardUUID
    escape: Escape
    pids: tuple[int, ...]
    used_bytes: int
    granted_bytes: int

    @property
    def key(self) -> str:
        """``namespace/pod/container``."""
        return f"{self.pod.key}/{self.container}"

    def describe(self) -> str:
        """The Event's message."""
        pids = ", ".join(str(p) for p in self.pids)
        return (
            f"container {self.container} {_WHAT[self.escape]}: process(es) {pids} on card"
            f" {self.card} use {quantities.format_bytes(self.used_bytes)}, grant"
            f" {quantities.format_bytes(self.granted_bytes)} [{self.escape}]"
        )


def find(
    processes: Iterable[ProcessUsage],
    *,
    isolation: Isolation,
    locator: ProcessLocator,
    pods: Iterable[PodInfo],
    grants: Mapping[tuple[PodKey, str], tuple[CardUUID, int]],
    slack_bytes: int,
) -> list[Finding]:
    """Every escape the processes show now, one finding per container and kind."""
    if isolation == "none":
        return []
    granted_pods = {pod_key for pod_key, _ in grants}
    by_uid = {pod.uid: pod for pod in pods if pod.uid and pod.key in granted_pods}
    found: dict[tuple[PodKey, str, Escape], tuple[PodInfo, list[ProcessUsage]]] = {}
    per_container: dict[tuple[PodKey, str], tuple[PodInfo, list[ProcessUsage]]] = {}
    for process in processes:
        where = locator.locate(process.pid)
        pod = by_uid.get(where.pod_uid) if where is not None else None
        if pod is None or where is None:
            continue
        container = pod.container_ids.get(where.container_id, where.container_id[:12])
        per_container.setdefault((pod.key, container), (pod, []))[1].append(process)
        escape = _escape_of(process, isolation, grants.get((pod.key, container)), slack_bytes)
        if escape is not None:
            found.setdefault((pod.key, container, escape), (pod, []))[1].append(process)
    if isolation == "cgroup":
        for (pod_key, container), (pod, held) in per_container.items():
            _, granted = grants.get((pod_key, container), (CardUUID(""), 0))
            if granted and sum(p.used_bytes for p in held) > granted + slack_bytes:
                found[(pod_key, container, "over-limit")] = (pod, held)
    findings = []
    for (pod_key, container, escape), (pod, held) in found.items():
        card, granted = grants.get((pod_key, container), (held[0].card, 0))
        findings.append(
            Finding(
                pod=pod,
                container=container,
                card=card,
                escape=escape,
                pids=tuple(sorted(p.pid for p in held)),
                used_bytes=sum(p.used_bytes for p in held),
                granted_bytes=granted,
            )
        )
    return findings


def _escape_of(
    process: ProcessUsage,
    isolation: Isolation,
    grant: tuple[CardUUID, int] | None,
    slack_bytes: int,
) -> Escape | None:
    if isolation not in config.MPS_MODES:
        return None
    if process.kind == "mps-server":
        return "own-mps-daemon"
    if process.kind == "cuda":
        return "outside-mps"
    if process.kind == "mps-client" and grant and process.used_bytes > grant[1] + slack_bytes:
        return "over-limit"
    return None


class Guard:
    """Acts on each finding at once, once per episode: an Event, and an eviction if configured."""

    def __init__(
        self,
        api: kube.NodeApi | None,
        *,
        node: str,
        action: Literal["event", "evict"],
        on_escape: Callable[[Finding], None] = lambda _: None,
    ) -> None:
        self._api = api
        self._node = node
        self._action = action
        self._on_escape = on_escape
        self._seen: set[tuple[str, Escape]] = set()

    async def check(self, findings: Iterable[Finding]) -> list[Finding]:
        """Act on findings new since the last call; returns those acted on now."""
        now = {(f.key, f.escape): f for f in findings}
        fresh = [f for k, f in now.items() if k not in self._seen]
        self._seen = set(now)
        for finding in fresh:
            self._on_escape(finding)
            await self._act(finding)
        return fresh

    async def _act(self, finding: Finding) -> None:
        evict = self._action == "evict"
        message = finding.describe() + ("; evicting the pod" if evict else "")
        logger.warning("pod %s: %s", finding.pod.key, message)
        if self._api is None:
            return
        try:
            await self._api.post_event(finding.pod, reason=REASON, message=message, node=self._node)
        except ApiError as exc:
            logger.warning("pod %s: cannot post the escape Event: %s", finding.pod.key, exc)
        if evict:
            try:
                await self._api.evict(finding.pod.namespace, finding.pod.name)
            except ApiError as exc:
                logger.error("pod %s: cannot evict after an escape: %s", finding.pod.key, exc)
