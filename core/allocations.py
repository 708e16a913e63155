"""The allocation annotations: where a pod's memory is, written on the Binding, read by every part.

The extender writes them on the Binding at bind time; the device plugin rewrites them when the
device IDs kubelet gave disagree; the extender reads them back after a restart. A pod with one
memory-requesting container (nearly all of them) carries::

    gpushare.io/card-uuid: GPU-5d3c...        gpushare.io/card-total-bytes: "85017755648"
    gpushare.io/card-index: "3"               gpushare.io/granted-bytes: "21474836480"
    gpushare.io/bind-time: "2026-01-01T12:00:00.123Z"

``card-total-bytes`` is the card's CUDA-visible total (NVML total less the driver's reserve), the
figure vLLM's utilization divides. When several containers request memory, the pod-level keys
describe the first one and :data:`names.ANNOTATION_ALLOCATIONS` lists them all as JSON, in the
order of the pod's containers.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from gpushare.core import errors, names
from gpushare.core.ids import CardUUID

__all__ = ["Allocation", "decode", "encode", "format_time"]


@dataclass(frozen=True, slots=True)
class Allocation:
    """One container's memory on one card."""

    container: str
    card: CardUUID
    index: int
    card_total_bytes: int
    """The card's CUDA-visible total when the grant was made."""
    granted_bytes: int
    """The grant itself, without the per-allocation overhead."""


_KEYS: Final = {
    "card-uuid": names.ANNOTATION_CARD_UUID,
    "card-index": names.ANNOTATION_CARD_INDEX,
    "card-total-bytes": names.ANNOTATION_CARD_TOTAL,
    "granted-bytes": names.ANNOTATION_GRANTED_BYTES,
}


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-01-01T12:00:00.123Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(allocation: Allocation) -> dict[str, Any]:
    return {
        "card-uuid": allocation.card,
        "card-index": allocation.index,
        "card-total-bytes": allocation.card_total_bytes,
        "granted-bytes": allocation.granted_bytes,
    }


def encode(
    allocations: Sequence[Allocation], *, bind_time: datetime | None = None
) -> dict[str, str]:
    """The annotations that record ``allocations`` (empty when there are none).

    ``bind_time`` is written at bind; a correction leaves it out and so keeps the bind's.
    """
    if not allocations:
        return {}
    result = {_KEYS[key]: str(value) for key, value in _fields(allocations[0]).items()}
    if bind_time is not None:
        result[names.ANNOTATION_BIND_TIME] = format_time(bind_time)
    if len(allocations) > 1:
        entries = [{"container": a.container, **_fields(a)} for a in allocations]
        result[names.ANNOTATION_ALLOCATIONS] = json.dumps(entries, separators=(",", ":"))
    return result


def decode(
    annotations: Mapping[str, str], containers: Sequence[str]
) -> tuple[Allocation, ...] | None:
    """The allocations a bound pod's annotations record, or ``None`` when it carries none.

    ``containers`` are the names of the pod's memory-requesting containers in spec order; the
    pod-level keys belong to the first. Raises :class:`BadRequest` when the annotations are present
    but do not parse.
    """
    if not containers:
        return None
    listed = annotations.get(names.ANNOTATION_ALLOCATIONS)
    if listed is not None:
        return _decode_list(listed)
    if names.ANNOTATION_CARD_UUID not in annotations:
        return None
    raw = {key: annotations.get(name) for key, name in _KEYS.items()}
    return (_allocation(containers[0], raw, where="annotations"),)


def _decode_list(text: str) -> tuple[Allocation, ...]:
    where = f"annotation {names.ANNOTATION_ALLOCATIONS}"
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.BadRequest(f"{where} is not JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise errors.BadRequest(f"{where} must be a non-empty JSON list")
    result = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("container"), str):
            raise errors.BadRequest(f"{where}[{position}] has no container name")
        result.append(_allocation(entry["container"], entry, where=f"{where}[{position}]"))
    return tuple(result)


def _allocation(container: str, raw: Mapping[str, Any], *, where: str) -> Allocation:
    uuid = raw.get("card-uuid")
    if not isinstance(uuid, str) or not uuid:
        raise errors.BadRequest(f"{where}: card-uuid is missing")
    numbers = {}
    for key in ("card-index", "card-total-bytes", "granted-bytes"):
        value = raw.get(key)
        try:
            number = int(value) if isinstance(value, int | str) else -1
        except ValueError:
            number = -1
        if number < 0:
            raise errors.BadRequest(f"{where}: {key} {value!r} is not a non-negative integer")
        numbers[key] = number
    return Allocation(
        container=container,
        card=CardUUID(uuid),
        index=numbers["card-index"],
        card_total_bytes=numbers["card-total-bytes"],
        granted_bytes=numbers["granted-bytes"],
    )
