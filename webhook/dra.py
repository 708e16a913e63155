"""The mutation's second output: with ``backend: dra`` the grant becomes a ResourceClaim. Pure.

The extender's mutation (:mod:`.mutation`) is computed first and then rewritten here:

- the GPU container's ``nvidia.com/gpu`` goes and no extended resource takes its place; the
  container names the pod's claim ``gpushare-gpu-memory`` in ``resources.claims`` instead;
- the pod gets that claim from the ResourceClaimTemplate of its grant's size
  (:func:`gpushare.core.dra.template_name`, one per size and namespace; the webhook creates it);
- ``schedulerName`` is left as it is: kube-scheduler's own DRA allocator places the pod;
- the vLLM argument carries its value itself: kubelet expands ``$(VAR)`` only from variables it
  knows, and a DRA driver hands the container its environment through CDI, which only the
  container runtime reads. The value is computed for the largest card any node reports, so on a
  smaller card vLLM budgets less than its grant, never more (the grant itself is enforced on the
  node); a pod that runs vLLM is refused while no node reports a card;
- the ``mutated`` mark stays as the extender's mutation wrote it.

A pod that already names the claim was rewritten before (re-invocation): it is left alone.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpushare.core import config, dra, names, quantities, sizing
from gpushare.webhook.validation import Reason

Patch = tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Rewritten:
    """The DRA patch and warnings, or why the pod is refused."""

    patch: Patch = ()
    warnings: tuple[str, ...] = ()
    refusal: Reason | None = None


def holds_claim(body: Mapping[str, Any]) -> bool:
    """Whether the pod already carries gpushare's claim (a re-invoked, rewritten pod)."""
    claims = (body.get("spec") or {}).get("resourceClaims") or []
    return any(
        isinstance(claim, Mapping) and claim.get("name") == names.DRA_CLAIM_NAME for claim in claims
    )


def rewrite(
    body: Mapping[str, Any],
    patch: Patch,
    warnings: tuple[str, ...],
    *,
    index: int,
    units: int,
    settings: config.Settings,
    largest_cuda_total_bytes: int | None,
) -> Rewritten:
    """The extender's patch and warnings for container ``index``, turned into the DRA ones."""
    spec: Mapping[str, Any] = body["spec"]
    container: Mapping[str, Any] = spec["containers"][index]
    base = f"/spec/containers/{index}"
    granted = units * settings.unit_bytes
    template = dra.template_name(granted, unit_bytes=settings.unit_bytes)
    kept = [op for op in patch if op["path"] not in (f"{base}/resources", "/spec/schedulerName")]
    lines = _command_line(
        container, kept, base=base, granted=granted, settings=settings,
        largest_cuda_total_bytes=largest_cuda_total_bytes,
    )  # fmt: skip
    if isinstance(lines, Reason):
        return Rewritten(refusal=lines)
    kept = [op for op in kept if op["path"] not in (f"{base}/command", f"{base}/args")] + lines
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
        note.replace(
            names.VLLM_UTILIZATION_ARG, f"{names.VLLM_UTILIZATION_FLAG} for the largest card"
        )
        for note in warnings
        if names.RESOURCE_GPU_MEMORY not in note and "schedulerName" not in note
    ]
    notes.append(
        f"gpushare: container {container['name']}: {names.NVIDIA_GPU_RESOURCE} replaced by"
        f" claim {names.DRA_CLAIM_NAME} from ResourceClaimTemplate {template}"
        f" ({quantities.format_bytes(granted)} of one card, allocated by kube-scheduler)"
    )
    return Rewritten(patch=(*ops, *kept), warnings=tuple(notes))


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


def _command_line(
    container: Mapping[str, Any],
    patch: list[dict[str, Any]],
    *,
    base: str,
    granted: int,
    settings: config.Settings,
    largest_cuda_total_bytes: int | None,
) -> list[dict[str, Any]] | Reason:
    """The container's command and args ops, the utilization written out as a literal."""
    planned = {op["path"]: op["value"] for op in patch}
    ops = []
    for key in ("command", "args"):
        path = f"{base}/{key}"
        value = planned.get(path, container.get(key))
        if value and any(names.VLLM_UTILIZATION_ARG in item for item in value):
            if largest_cuda_total_bytes is None:
                return _no_card_yet()
            literal = _utilization_arg(granted, settings, largest_cuda_total_bytes)
            ops.append(
                _add(path, [item.replace(names.VLLM_UTILIZATION_ARG, literal) for item in value])
            )
        elif path in planned:
            ops.append(_add(path, value))
    return ops


def _utilization_arg(granted: int, settings: config.Settings, cuda_total_bytes: int) -> str:
    """``--gpu-memory-utilization=<value>`` for the grant on a card of ``cuda_total_bytes``."""
    value = sizing.utilization(
        granted_bytes=granted,
        reserve_bytes=settings.reserve_bytes,
        cuda_total_bytes=cuda_total_bytes,
    )
    return f"{names.VLLM_UTILIZATION_FLAG}={sizing.format_utilization(value)}"


def _no_card_yet() -> Reason:
    message = (
        f"with the DRA backend the webhook writes vLLM's {names.VLLM_UTILIZATION_FLAG} itself,"
        " for the largest card a node reports, and no GPU node has reported its cards yet:"
        " retry once the gpushare agents run"
    )
    return Reason("no-cards-reported", message)


def _add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}
