"""Reconciliation: pod annotations follow the device IDs kubelet actually gave.

The extender writes the card it chose for each container on the Binding; kubelet may still have
handed other IDs (a wrong preference guess, a node restart). The IDs are the truth, so annotations
that disagree are rewritten with the core's codec (the pod-level keys and, for a pod with several
memory containers, ``gpushare.io/allocations``), and the extender's ledger, which reads them back,
converges.
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gpushare.core import allocations, errors
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin import allocation, kube
from gpushare.deviceplugin.nvml import CardReading
from gpushare.deviceplugin.podresources import Holding
from gpushare.deviceplugin.pods import PodInfo
from gpushare.runtime.errors import ApiError

logger = logging.getLogger(__name__)

REASON: Final = "GpuShareAnnotationsCorrected"


@dataclass(frozen=True)
class Correction:
    """Annotations to set on a pod, and why."""

    pod: PodInfo
    annotations: Mapping[str, str]
    message: str


@dataclass(frozen=True)
class Held:
    """One container's grant, as kubelet's devices say."""

    container: str
    grant: allocation.Grant


def grants_by_pod(holdings: Iterable[Holding], *, unit_bytes: int) -> dict[PodKey, list[Held]]:
    """Each pod's grants, one per container (IDs spanning cards, refused by Allocate, skipped)."""
    result: dict[PodKey, list[Held]] = {}
    for holding in holdings:
        try:
            grant = allocation.grant_of(holding.devices, unit_bytes=unit_bytes)
        except errors.BadRequest as exc:
            logger.warning("pod %s container %s: %s", holding.pod, holding.container, exc)
            continue
        result.setdefault(holding.pod, []).append(Held(holding.container, grant))
    return result


def corrections(
    pods: Iterable[PodInfo],
    grants: Mapping[PodKey, Sequence[Held]],
    cards: Mapping[CardUUID, CardReading],
) -> list[Correction]:
    """Pods whose allocation annotations disagree with their devices, container by container."""
    result = []
    for pod in pods:
        held = {h.container: h.grant for h in grants.get(pod.key, ())}
        truth = _allocations(pod, held, cards)
        if truth is None:
            continue
        expected = allocations.encode(truth)
        changed = {k: v for k, v in expected.items() if pod.annotations.get(k) != v}
        if changed:
            was = ", ".join(f"{k}={pod.annotations.get(k)!r}" for k in sorted(changed))
            now = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
            result.append(Correction(pod, changed, f"kubelet's devices say {now} (was {was})"))
    return result


def _allocations(
    pod: PodInfo, held: Mapping[str, allocation.Grant], cards: Mapping[CardUUID, CardReading]
) -> list[Allocation] | None:
    """Every memory container's allocation from its devices; ``None`` until all are known."""
    containers = list(pod.requests) or list(held)
    if not containers or any(c not in held for c in containers):
        return None
    truth = []
    for container in containers:
        grant = held[container]
        reading = cards.get(grant.card)
        if reading is None:
            return None
        # card-total-bytes is the CUDA-visible total, as the extender writes it: what vLLM's
        # utilization divides by.
        truth.append(
            Allocation(
                container=container,
                card=grant.card,
                index=reading.index,
                card_total_bytes=reading.cuda_total_bytes,
                granted_bytes=grant.granted_bytes,
            )
        )
    return truth


async def apply(api: kube.NodeApi, fixes: Iterable[Correction], *, node: str) -> int:
    """Patch each pod and record an Event; returns how many were patched."""
    done = 0
    for fix in fixes:
        try:
            await api.patch_pod_annotations(fix.pod.namespace, fix.pod.name, fix.annotations)
            done += 1
            logger.info("pod %s: %s", fix.pod.key, fix.message)
            await api.post_event(
                fix.pod, reason=REASON, message=fix.message, warning=False, node=node
            )
        except ApiError as exc:
            logger.warning("pod %s: cannot correct annotations: %s", fix.pod.key, exc)
    return done
