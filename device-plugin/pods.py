"""Pods of this node as the plugin needs them, and which container kubelet is admitting now.

``GetPreferredAllocation`` is not told its pod. kubelet admits a batch of new pods in creation-time
order (``HandlePodAdditions`` sorts them by a timestamp of whole seconds; within one second the
plugin takes bind order, the order in which kubelet usually receives them) and a pod's containers
in spec order, calling the plugin once per container that asks for memory. The guess follows that:
the first pending, non-terminating pod bound to one of our cards, in that order, whose next
container without devices asks for the requested units; its card is the one the extender recorded
for that container. A wrong guess costs only a preference: the IDs decide the card, and
reconciliation corrects the annotations.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from gpushare.core import allocations, errors, names, quantities
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, PodKey, pod_key

_EPOCH = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True)
class PodInfo:
    """The fields of a Pod the plugin reads."""

    namespace: str
    name: str
    uid: str = ""
    node: str = ""
    phase: str = "Pending"
    annotations: Mapping[str, str] = field(default_factory=dict)
    requests: Mapping[str, int] = field(default_factory=dict)
    """Units of ``gpushare.io/gpu-memory`` per container name (containers that ask for some)."""
    container_ids: Mapping[str, str] = field(default_factory=dict)
    """Runtime container ID (scheme stripped) to container name, from the pod's status."""
    claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """ResourceClaims (``namespace/name``) each container uses, by container name (DRA backend)."""
    created: datetime = _EPOCH
    deleting: bool = False
    """The pod has a deletion timestamp: kubelet will not start it."""

    @property
    def key(self) -> PodKey:
        """``namespace/name``."""
        return pod_key(self.namespace, self.name)

    def allocations(self) -> dict[str, Allocation]:
        """The extender's allocations by container name (none when absent or unreadable)."""
        try:
            found = allocations.decode(self.annotations, list(self.requests))
        except errors.BadRequest:
            return {}
        return {a.container: a for a in found or ()}

    @property
    def bind_time(self) -> datetime:
        """The extender's bind time, else the creation time."""
        return _parse_time(self.annotations.get(names.ANNOTATION_BIND_TIME)) or self.created

    @classmethod
    def from_api(cls, pod: Mapping[str, Any]) -> "PodInfo":
        """Read a Pod in the API's JSON form (camelCase keys)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        requests = {}
        for container in spec.get("containers") or []:
            resources = container.get("resources") or {}
            amount = (resources.get("limits") or {}).get(names.RESOURCE_GPU_MEMORY) or (
                resources.get("requests") or {}
            ).get(names.RESOURCE_GPU_MEMORY)
            if amount is not None:
                try:
                    requests[container["name"]] = quantities.parse_bytes(str(amount))
                except errors.QuantityError:
                    continue
        container_ids = {}
        namespace = meta.get("namespace", "")
        pod_claims = {  # the pod's claim names to ResourceClaims: named, or made from a template
            entry["name"]: entry["resourceClaimName"]
            for entry in [*(spec.get("resourceClaims") or []),
                          *(status.get("resourceClaimStatuses") or [])]
            if entry.get("name") and entry.get("resourceClaimName")
        }  # fmt: skip
        claims = {}
        for container in spec.get("containers") or []:
            used = tuple(
                f"{namespace}/{pod_claims[ref['name']]}"
                for ref in (container.get("resources") or {}).get("claims") or []
                if ref.get("name") in pod_claims
            )
            if used:
                claims[container["name"]] = used
        for state in status.get("containerStatuses") or []:
            raw = state.get("containerID") or ""
            if raw:
                container_ids[raw.partition("://")[2] or raw] = state["name"]
        return cls(
            namespace=namespace,
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            node=spec.get("nodeName") or "",
            phase=status.get("phase") or "Pending",
            annotations=dict(meta.get("annotations") or {}),
            requests=requests,
            container_ids=container_ids,
            claims=claims,
            created=_parse_time(_as_text(meta.get("creationTimestamp"))) or _EPOCH,
            deleting=meta.get("deletionTimestamp") is not None,
        )


class PodSource(Protocol):
    """Pods bound to this node, as known now (no call to the API server)."""

    def pods(self) -> list[PodInfo]:
        """The pods known now."""
        ...


@dataclass(frozen=True)
class Wanted:
    """The container the plugin believes kubelet is admitting, and the card chosen for it."""

    pod: PodInfo
    container: str
    card: CardUUID


def admission_order(pod: PodInfo) -> tuple[datetime, datetime, str]:
    """kubelet's order: creation time, then (same second) bind order, then the name."""
    return (pod.created, pod.bind_time, pod.key)


def next_wanted(
    pods: Iterable[PodInfo],
    *,
    units: int,
    unit_bytes: int,
    cards: Collection[CardUUID],
    held: Collection[tuple[PodKey, str]],
) -> Wanted | None:
    """The first container, in kubelet's admission order, that may be asking for ``units`` now.

    Only each pod's next container without devices (``held``: pod and container names that
    kubelet's PodResources lists) can be the one admitted; it must ask for ``units`` (or have
    been granted that much) and have a card of ours recorded.
    """
    for pod in sorted(pods, key=admission_order):
        if pod.phase != "Pending" or pod.deleting:
            continue
        waiting = [c for c in pod.requests if (pod.key, c) not in held]
        if not waiting:
            continue
        container = waiting[0]
        recorded = pod.allocations().get(container)
        if recorded is None or recorded.card not in cards:
            continue
        if pod.requests[container] == units or recorded.granted_bytes == units * unit_bytes:
            return Wanted(pod, container, recorded.card)
    return None


def _as_text(value: object) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return value if isinstance(value, str) else None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
