"""Reconciliation: pod annotations follow the device IDs kubelet actually gave.

The extender writes the card it chose on the Binding; kubelet may still have handed other IDs (a
wrong preference guess, a node restart). The IDs are the truth, so annotations that disagree are
patched, and the extender's ledger, which reads them, converges.
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gpushare import errors, names
from gpushare.deviceplugin import allocation, kube
from gpushare.deviceplugin.nvml import CardReading
from gpushare.deviceplugin.podresources import Holding
from gpushare.deviceplugin.pods import PodInfo
from gpushare.ids import CardUUID, PodKey

logger = logging.getLogger(__name__)

REASON: Final = "GpuShareAnnotationsCorrected"


@dataclass(frozen=True)
class Correction:
    """Annotations to set on a pod, and why."""

    pod: PodInfo
    annotations: Mapping[str, str]
    message: str


def grants_by_pod(
    holdings: Iterable[Holding], *, unit_bytes: int
) -> dict[PodKey, list[allocation.Grant]]:
    """Each pod's grants, one per container (IDs spanning cards, refused by Allocate, skipped)."""
    result: dict[PodKey, list[allocation.Grant]] = {}
    for holding in holdings:
        try:
            grant = allocation.grant_of(holding.devices, unit_bytes=unit_bytes)
        except errors.BadRequest as exc:
            logger.warning("pod %s container %s: %s", holding.pod, holding.container, exc)
            continue
        result.setdefault(holding.pod, []).append(grant)
    return result


def corrections(
    pods: Iterable[PodInfo],
    grants: Mapping[PodKey, Sequence[allocation.Grant]],
    cards: Mapping[CardUUID, CardReading],
) -> list[Correction]:
    """Pods whose card or grant annotations disagree with their devices."""
    result = []
    for pod in pods:
        held = grants.get(pod.key)
        if not held:
            continue
        card = held[0].card
        expected = {
            names.ANNOTATION_CARD_UUID: card,
            names.ANNOTATION_GRANTED_BYTES: str(sum(g.granted_bytes for g in held)),
        }
        reading = cards.get(card)
        if reading is not None:
            expected[names.ANNOTATION_CARD_INDEX] = str(reading.index)
            # The CUDA-visible total, as the extender writes it: what vLLM's utilization divides by.
            expected[names.ANNOTATION_CARD_TOTAL] = str(reading.cuda_total_bytes)
        changed = {k: v for k, v in expected.items() if pod.annotations.get(k) != v}
        if changed:
            was = ", ".join(f"{k}={pod.annotations.get(k)!r}" for k in sorted(changed))
            now = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
            result.append(Correction(pod, changed, f"kubelet's devices say {now} (was {was})"))
    return result


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
        except kube.ApiError as exc:
            logger.warning("pod %s: cannot correct annotations: %s", fix.pod.key, exc)
    return done
