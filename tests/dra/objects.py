"""DRA objects as kube-controller-manager and the agent would write them on the test apiserver.

No kube-controller-manager runs, so its ResourceClaim controller is done here by hand
(:func:`create_pod_claims`): a claim per template entry, owned by the pod, named in the pod's
``status.resourceClaimStatuses``, as ``pkg/controller/resourceclaim`` does.
"""

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare.core import config, dra, names, quantities
from gpushare.core.nodereport import CardReport
from gpushare.webhook import mutation
from tests import cluster
from tests.webhook import builders

RESOURCE: Final = f"/apis/{names.DRA_API_VERSION}"
DEVICE_CLASS_MANIFEST: Final = (
    Path(__file__).resolve().parents[2] / "manifests" / "components" / "dra" / "deviceclass.yaml"
)
H100_TOTAL: Final = "81559Mi"
H100_RESERVED: Final = "480Mi"
"""An H100 80GB as NVML reports it (measured)."""

POD_CLAIM_NAME_ANNOTATION: Final = "resource.kubernetes.io/pod-claim-name"
"""What the ResourceClaim controller writes on each claim it makes (k8s.io/api resource/v1)."""


def install_device_class(rest: cluster.Rest) -> None:
    """Create the DeviceClass from its manifest (already there: fine)."""
    body = yaml.safe_load(DEVICE_CLASS_MANIFEST.read_text())
    try:
        rest.create(f"{RESOURCE}/deviceclasses", body)
    except cluster.ApiError as exc:
        if exc.status != 409:
            raise


def publish_slice(
    rest: cluster.Rest, node: str, cards: Sequence[CardReport], *, unit_bytes: int, overhead: int
) -> dict[str, Any]:
    """The node's ResourceSlice as the agent writes it."""
    body = dra.resource_slice(
        node, cards, generation=1, unit_bytes=unit_bytes, overhead_bytes=overhead
    )
    return rest.create(f"{RESOURCE}/resourceslices", body)


def delete_slices(rest: cluster.Rest, nodes: Sequence[str]) -> None:
    for node in nodes:
        with contextlib.suppress(cluster.ApiError):
            rest.delete(f"{RESOURCE}/resourceslices/{dra.slice_name(node)}")


def create_pod_claims(rest: cluster.Rest, pod: dict[str, Any]) -> list[str]:
    """Make the pod's claims from its templates and record them in its status; their names."""
    meta = pod["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    statuses = []
    for entry in pod["spec"].get("resourceClaims") or []:
        template_name = entry.get("resourceClaimTemplateName")
        if template_name is None:
            continue
        path = f"{RESOURCE}/namespaces/{namespace}/resourceclaimtemplates/{template_name}"
        template = rest.get(path)
        claim = {
            "apiVersion": names.DRA_API_VERSION,
            "kind": "ResourceClaim",
            "metadata": {
                "generateName": f"{name}-{entry['name']}-",
                "namespace": namespace,
                "annotations": {POD_CLAIM_NAME_ANNOTATION: entry["name"]},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": name,
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"]["spec"],
        }
        created = rest.create(f"{RESOURCE}/namespaces/{namespace}/resourceclaims", claim)
        statuses.append({"name": entry["name"], "resourceClaimName": created["metadata"]["name"]})
    if statuses:
        rest.patch(
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {"status": {"resourceClaimStatuses": statuses}},
            "merge",
        )
    return [status["resourceClaimName"] for status in statuses]


def claims(rest: cluster.Rest, namespace: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = rest.get(f"{RESOURCE}/namespaces/{namespace}/resourceclaims")[
        "items"
    ]
    return found


def create_pod(
    rest: cluster.Rest,
    namespace: str,
    memory: str,
    fixture: str,
    *,
    settings: config.Settings | None = None,
) -> dict[str, Any]:
    """A fixture's predictor pod, mutated by the webhook for the DRA backend, with its claim.

    The template of its size is created as the webhook does; the claim as the ResourceClaim
    controller does.
    """
    settings = settings or config.Settings(backend="dra")
    isvc = builders.isvc(fixture, memory=memory)
    isvc["metadata"]["namespace"] = namespace
    pod = builders.predictor_pod(isvc)
    largest = quantities.parse_bytes(H100_TOTAL) - quantities.parse_bytes(H100_RESERVED)
    result = mutation.pod(pod, settings=settings, largest_cuda_total_bytes=largest)
    assert result.allowed, result.message
    pod = builders.apply(pod, result.patch)
    units = quantities.to_units(quantities.parse_bytes(memory), settings.unit_bytes)
    template = dra.claim_template(
        namespace,
        units * settings.unit_bytes,
        unit_bytes=settings.unit_bytes,
        overhead_bytes=settings.allocation_overhead_bytes,
    )
    try:
        rest.create(f"{RESOURCE}/namespaces/{namespace}/resourceclaimtemplates", template)
    except cluster.ApiError as exc:
        if exc.status != 409:
            raise
    created = rest.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    create_pod_claims(rest, created)
    return created
