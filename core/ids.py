"""String IDs that must not mix."""

from typing import NewType

CardUUID = NewType("CardUUID", str)
"""An NVIDIA card UUID as NVML reports it (``GPU-5d3c...``)."""

NodeName = NewType("NodeName", str)
"""A Kubernetes Node's name."""

DeviceID = NewType("DeviceID", str)
"""A device-plugin ID: ``<card>-<unit>``."""

PodKey = NewType("PodKey", str)
"""``namespace/name`` of a pod."""


def pod_key(namespace: str, name: str) -> PodKey:
    """The ``namespace/name`` key of a pod."""
    return PodKey(f"{namespace}/{name}")
