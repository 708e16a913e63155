"""The DRA backend's objects and arithmetic: cards as consumable capacity, claims as grants.

Each card is one device of the node's ResourceSlice with ``allowMultipleAllocations`` and a
``memory`` capacity (its CUDA-visible total, whole units). A claim asks for its grant plus the
per-allocation overhead (one MPS server per grant in ``mps`` isolation), the same cost the
extender charges (:func:`gpushare.core.placement.cost`), so kube-scheduler's allocator packs a card
exactly as far as the extender would. The capacity's request policy (minimum one unit plus the
overhead, steps of one unit) rounds any other request up to that form, so the node side recovers
the grant as ``consumed - overhead`` whatever a tenant wrote in its own claim.

Objects are plain dicts in the API's own spelling (``resource.k8s.io/v1``).
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gpushare.core import errors, names, placement, quantities
from gpushare.core.nodereport import CardReport

JsonObject = dict[str, Any]

MAX_DEVICES_PER_SLICE: Final = 128
"""resource.k8s.io/v1 ResourceSliceMaxDevices: far above any node's card count."""


def capacity_bytes(cuda_total_bytes: int, unit_bytes: int) -> int:
    """A card's consumable memory: its CUDA-visible total in whole units (rounded down)."""
    return quantities.card_units(max(cuda_total_bytes, 0), unit_bytes) * unit_bytes


def request_bytes(granted_bytes: int, *, unit_bytes: int, overhead_bytes: int) -> int:
    """What a claim consumes for a grant: whole units plus the per-allocation overhead."""
    units = quantities.to_units(granted_bytes, unit_bytes)
    return placement.cost(units * unit_bytes, overhead_bytes)


def granted_bytes(consumed_bytes: int, *, unit_bytes: int, overhead_bytes: int) -> int:
    """The grant a consumed amount pays for: less the overhead, rounded down to whole units.

    Raises :class:`BadRequest` when nothing is left for a grant (a claim not made by the policy).
    """
    units = (consumed_bytes - overhead_bytes) // unit_bytes
    if units <= 0:
        raise errors.BadRequest(
            f"a claim consuming {quantities.format_bytes(consumed_bytes)} leaves no whole unit of"
            f" {quantities.format_bytes(unit_bytes)} after the per-allocation overhead of"
            f" {quantities.format_bytes(overhead_bytes)}: ask for at least"
            f" {quantities.to_quantity(unit_bytes)}"
        )
    return units * unit_bytes


def request_policy(*, capacity: int, unit_bytes: int, overhead_bytes: int) -> JsonObject:
    """The capacity's policy: from one unit plus overhead to the whole card, in steps of a unit.

    kube-apiserver wants the maximum on a step from the minimum, so it is the largest grant the
    card holds plus the overhead.
    """
    smallest = request_bytes(unit_bytes, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)
    largest = smallest + (capacity - smallest) // unit_bytes * unit_bytes
    return {
        "default": quantities.to_quantity(smallest),
        "validRange": {
            "min": quantities.to_quantity(smallest),
            "max": quantities.to_quantity(largest),
            "step": quantities.to_quantity(unit_bytes),
        },
    }


def device_class() -> JsonObject:
    """The DeviceClass of the backend: the devices of gpushare's driver."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": names.DRA_DEVICE_CLASS},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{names.DRA_DRIVER}"'}}]},
    }


def device_name(index: int) -> str:
    """A card's device name in the slice (a DNS label): ``gpu-0``."""
    return f"gpu-{index}"


def device(card: CardReport, *, unit_bytes: int, overhead_bytes: int) -> JsonObject:
    """One card as a shareable device with consumable memory."""
    capacity = capacity_bytes(card.cuda_total_bytes, unit_bytes)
    return {
        "name": device_name(card.index),
        "attributes": {
            names.DRA_ATTRIBUTE_UUID: {"string": card.uuid},
            names.DRA_ATTRIBUTE_MODEL: {"string": card.model},
            names.DRA_ATTRIBUTE_INDEX: {"int": card.index},
        },
        "capacity": {
            names.DRA_CAPACITY_MEMORY: {
                "value": quantities.to_quantity(capacity),
                "requestPolicy": request_policy(
                    capacity=capacity, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes
                ),
            }
        },
        "allowMultipleAllocations": True,
    }


def slice_name(node: str) -> str:
    """The node's ResourceSlice: ``<node>-gpu.gpushare.io`` (a DNS subdomain, as both parts are)."""
    return f"{node}-{names.DRA_DRIVER}"


def publishable(
    cards: Iterable[CardReport], *, unit_bytes: int, overhead_bytes: int
) -> list[CardReport]:
    """The cards a slice offers: healthy ones with room for two of the smallest grant.

    (kube-apiserver refuses a policy whose first step passes the capacity.)
    """
    smallest = request_bytes(2 * unit_bytes, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)
    return sorted(
        (
            card
            for card in cards
            if card.healthy and capacity_bytes(card.cuda_total_bytes, unit_bytes) >= smallest
        ),
        key=lambda card: (card.index, card.uuid),
    )


def resource_slice(
    node: str,
    cards: Sequence[CardReport],
    *,
    generation: int,
    unit_bytes: int,
    overhead_bytes: int,
) -> JsonObject:
    """The node's one ResourceSlice: a pool named after the node, one device per offered card."""
    offered = publishable(cards, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)
    if len(offered) > MAX_DEVICES_PER_SLICE:
        raise errors.ConfigError(
            f"node {node} has {len(offered)} cards; one ResourceSlice holds at most"
            f" {MAX_DEVICES_PER_SLICE}"
        )
    return {
        "apiVersion": names.DRA_API_VERSION,
        "kind": "ResourceSlice",
        "metadata": {
            "name": slice_name(node),
            "labels": {names.LABEL_PART_OF: "gpushare"},
        },
        "spec": {
            "driver": names.DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": [
                device(card, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)
                for card in offered
            ],
        },
    }


def claim_spec(granted: int, *, unit_bytes: int, overhead_bytes: int) -> JsonObject:
    """A ResourceClaim's spec: one card of the class with the grant's memory (plus overhead)."""
    consumed = request_bytes(granted, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)
    return {
        "devices": {
            "requests": [
                {
                    "name": names.DRA_REQUEST_NAME,
                    "exactly": {
                        "deviceClassName": names.DRA_DEVICE_CLASS,
                        "allocationMode": "ExactCount",
                        "count": 1,
                        "capacity": {
                            "requests": {
                                names.DRA_CAPACITY_MEMORY: quantities.to_quantity(consumed)
                            }
                        },
                    },
                }
            ]
        }
    }


def template_name(granted: int, *, unit_bytes: int) -> str:
    """The ResourceClaimTemplate of one grant size: ``gpushare-gpu-memory-20gi``."""
    units = quantities.to_units(granted, unit_bytes)
    size = quantities.to_quantity(units * unit_bytes).lower()
    return f"{names.DRA_CLAIM_NAME}-{size}"


def claim_template(
    namespace: str, granted: int, *, unit_bytes: int, overhead_bytes: int
) -> JsonObject:
    """The ResourceClaimTemplate that gives each pod its own claim of ``granted`` bytes."""
    return {
        "apiVersion": names.DRA_API_VERSION,
        "kind": "ResourceClaimTemplate",
        "metadata": {
            "name": template_name(granted, unit_bytes=unit_bytes),
            "namespace": namespace,
            "labels": {names.LABEL_PART_OF: "gpushare"},
        },
        "spec": {"spec": claim_spec(granted, unit_bytes=unit_bytes, overhead_bytes=overhead_bytes)},
    }


@dataclass(frozen=True, slots=True)
class Allocated:
    """One device a claim was allocated from our driver, and the memory it consumes there."""

    request: str
    pool: str
    device: str
    share_id: str
    consumed_bytes: int


def allocated(claim: Mapping[str, Any]) -> list[Allocated]:
    """Our driver's results in a claim's ``status.allocation``; malformed ones raise BadRequest."""
    allocation = (claim.get("status") or {}).get("allocation") or {}
    results = (allocation.get("devices") or {}).get("results") or []
    out = []
    for result in results:
        if result.get("driver") != names.DRA_DRIVER:
            continue
        consumed = (result.get("consumedCapacity") or {}).get(names.DRA_CAPACITY_MEMORY)
        if consumed is None:
            raise errors.BadRequest(
                f"device {result.get('device')!r} was allocated without consumed"
                f" {names.DRA_CAPACITY_MEMORY!r}: the claim's class is not {names.DRA_DEVICE_CLASS}"
                " or consumable capacity is off in kube-scheduler"
            )
        out.append(
            Allocated(
                request=str(result.get("request", "")),
                pool=str(result.get("pool", "")),
                device=str(result.get("device", "")),
                share_id=str(result.get("shareID", "")),
                consumed_bytes=quantities.parse_bytes(str(consumed)),
            )
        )
    return out
