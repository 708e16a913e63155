"""The mutation's second output: with ``backend: dra`` the grant becomes a ResourceClaim. Pure.

The extender's mutation (:mod:`.mutation`) is computed first and then rewritten here:

- the GPU container's ``nvidia.com/gpu`` goes and no extended resource takes its place; the
  container names the pod's claim ``gpushare-gpu-memory`` in ``resources.claims`` instead;
- the pod gets that claim from the ResourceClaimTemplate of its grant's size
  (:func:`gpushare.dra.template_name`, one per size and namespace; the webhook creates it);
- ``schedulerName`` is left as it is: kube-scheduler's own DRA allocator places the pod;
- the vLLM argument and the ``mutated`` mark stay as the extender's mutation wrote them.

A pod that already names the claim was rewritten before (re-invocation): it is left alone.
"""

from collections.abc import Mapping
from typing import Any

from gpushare import config, dra, names, quantities

Patch = tuple[dict[str, Any], ...]


def holds_claim(body: Mapping[str, Any]) -> bool:
    """Whether the pod already carries gpushare's claim (a re-invoked, rewritten pod)."""
    claims = (body.get("spec") or {}).get("resourceClaims") or []
    return any(
        isinstance(claim, Mapping) and claim.get("name") == names.DRA_CLAIM_NAME for claim in claims
    )


def template_of(body: Mapping[str, Any]) -> str | None:
    """The ResourceClaimTemplate the pod's gpushare claim names, if any."""
    for claim in (body.get("spec") or {}).get("resourceClaims") or []:
        if isinstance(claim, Mapping) and claim.get("name") == names.DRA_CLAIM_NAME:
            template = claim.get("resourceClaimTemplateName")
            return template if isinstance(template, str) else None
    return None


def rewrite(
    body: Mapping[str, Any],
    patch: Patch,
    warnings: tuple[str, ...],
    *,
    index: int,
    units: int,
    settings: config.Settings,
) -> tuple[Patch, tuple[str, ...]]:
    """The extender's patch and warnings for container ``index``, turned into the DRA ones."""
    spec: Mapping[str, Any] = body["spec"]
    container: Mapping[str, Any] = spec["containers"][index]
    base = f"/spec/containers/{index}"
    granted = units * settings.unit_bytes
    template = dra.template_name(granted, unit_bytes=settings.unit_bytes)
    kept = [op for op in patch if op["path"] not in (f"{base}/resources", "/spec/schedulerName")]
    ops: list[dict[str, Any]] = []
    resources = claim_resources(container.get("resources") or {})
    if resources != container.get("resources"):
        ops.append(_add(f"{base}/resources", resources))
    entry = {"name": names.DRA_CLAIM_NAME, "resourceClaimTemplateName": template}
    if spec.get("resourceClaims"):
        ops.append(_add("/spec/resourceClaims/-", entry))
    else:
        ops.append(_add("/spec/resourceClaims", [entry]))
    notes = [
        note
        for note in warnings
        if names.RESOURCE_GPU_MEMORY not in note and "schedulerName" not in note
    ]
    notes.append(
        f"gpushare: container {container['name']}: {names.NVIDIA_GPU_RESOURCE} replaced by"
        f" claim {names.DRA_CLAIM_NAME} from ResourceClaimTemplate {template}"
        f" ({quantities.format_bytes(granted)} of one card, allocated by kube-scheduler)"
    )
    return (*ops, *kept), tuple(notes)


def claim_resources(resources: Mapping[str, Any]) -> dict[str, Any]:
    """``resources`` without GPU resources, naming gpushare's claim in ``claims``."""
    result = dict(resources)
    gpu = (names.NVIDIA_GPU_RESOURCE, names.RESOURCE_GPU_MEMORY)
    for kind in ("limits", "requests"):
        if kind in resources:
            result[kind] = {k: v for k, v in (resources[kind] or {}).items() if k not in gpu}
    claims = [c for c in resources.get("claims") or [] if c.get("name") != names.DRA_CLAIM_NAME]
    result["claims"] = [*claims, {"name": names.DRA_CLAIM_NAME}]
    return result


def _add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}
