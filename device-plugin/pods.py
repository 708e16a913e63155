"""Pods of this node as the plugin needs them, and the guess of which pod kubelet is admitting.

``GetPreferredAllocation`` is not told its pod. The guess: the oldest pod bound to this node (by
the bind time the extender wrote) whose request matches and that holds no devices yet. A wrong guess
costs only a preference: the IDs decide the card, and reconciliation corrects the annotations.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from gpushare import errors, names, quantities
from gpushare.ids import CardUUID, PodKey, pod_key

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
    created: datetime = _EPOCH

    @property
    def key(self) -> PodKey:
        """``namespace/name``."""
        return pod_key(self.namespace, self.name)

    @property
    def card(self) -> CardUUID | None:
        """The card the extender chose, if it wrote one."""
        value = self.annotations.get(names.ANNOTATION_CARD_UUID)
        return CardUUID(value) if value else None

    @property
    def bind_time(self) -> datetime:
        """The extender's bind time, else the creation time."""
        return _parse_time(self.annotations.get(names.ANNOTATION_BIND_TIME)) or self.created

    def granted_bytes(self) -> int | None:
        """The grant the extender wrote, if it parses."""
        try:
            return int(self.annotations[names.ANNOTATION_GRANTED_BYTES])
        except (KeyError, ValueError):
            return None

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
        for state in status.get("containerStatuses") or []:
            raw = state.get("containerID") or ""
            if raw:
                container_ids[raw.partition("://")[2] or raw] = state["name"]
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            node=spec.get("nodeName") or "",
            phase=status.get("phase") or "Pending",
            annotations=dict(meta.get("annotations") or {}),
            requests=requests,
            container_ids=container_ids,
            created=_parse_time(_as_text(meta.get("creationTimestamp"))) or _EPOCH,
        )


class PodSource(Protocol):
    """Pods bound to this node; :meth:`refresh` reads them afresh from the API."""

    def pods(self) -> list[PodInfo]:
        """The pods known now."""
        ...

    async def refresh(self) -> list[PodInfo]:
        """Read the pods from the API now (when the cache may lag a bind)."""
        ...


def choose_pod(
    pods: Iterable[PodInfo],
    *,
    units: int,
    unit_bytes: int,
    cards: Collection[CardUUID],
    holders: Collection[PodKey],
) -> PodInfo | None:
    """The oldest pending pod bound to one of ``cards`` that asks for ``units`` and holds none."""
    matching = [
        pod
        for pod in pods
        if pod.phase == "Pending"
        and pod.card in cards
        and pod.key not in holders
        and (units in pod.requests.values() or pod.granted_bytes() == units * unit_bytes)
    ]
    if not matching:
        return None
    return min(matching, key=lambda pod: (pod.bind_time, pod.created, pod.key))


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
