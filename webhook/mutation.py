"""The Pod mutation: a pod carrying ``gpushare.io/gpu-memory`` becomes a shared-GPU pod. Pure.

The container that holds the GPU (``nvidia.com/gpu``; failing that, the one container that runs
vLLM) gets ``gpushare.io/gpu-memory: <units>`` in place of ``nvidia.com/gpu``; if it runs vLLM,
its command line gets :data:`gpushare.names.VLLM_UTILIZATION_ARG` in place of any user value.
The pod gets gpushare's ``schedulerName`` and the :data:`gpushare.names.ANNOTATION_MUTATED` mark.
The result is a JSON patch (RFC 6902) computed from the pod as it is, so a mutated pod yields an
empty patch: re-invocation (``reinvocationPolicy: IfNeeded``) changes nothing.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpushare import config, names, quantities
from gpushare.webhook import dra, validation, vllm
from gpushare.webhook.validation import Reason

_DEFAULT_SCHEDULER: Final = "default-scheduler"


@dataclass(frozen=True)
class Mutation(validation.Verdict):
    """The outcome for one pod: refused when ``reasons`` is not empty, else ``patch`` (maybe [])."""

    patch: tuple[dict[str, Any], ...] = ()


def pod(
    body: Mapping[str, Any], *, settings: config.Settings, largest_cuda_total_bytes: int | None
) -> Mutation:
    """Mutate one pod on CREATE."""
    shape = _malformed(body)
    if shape is not None:
        return _refuse("malformed", f"the pod is malformed: {shape}")
    metadata: Mapping[str, Any] = body.get("metadata") or {}
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    if names.ANNOTATION_GPU_MEMORY not in annotations:
        return Mutation()
    if settings.backend == "dra" and dra.holds_claim(body):
        return Mutation()
    requested, reasons, warnings = validation.memory_bytes(
        annotations[names.ANNOTATION_GPU_MEMORY],
        settings=settings,
        largest_cuda_total_bytes=largest_cuda_total_bytes,
    )
    if names.ANNOTATION_POLICY in annotations:
        reasons += validation.policy(annotations[names.ANNOTATION_POLICY])
    if requested is None or reasons:
        return Mutation(reasons=tuple(reasons))
    spec: Mapping[str, Any] = body["spec"]
    containers: list[Mapping[str, Any]] = spec["containers"]
    plans = [vllm.plan(container) for container in containers]
    target, refusal = _target(spec, containers, plans)
    if refusal is not None:
        return Mutation(reasons=(refusal,))
    if target is None:
        return Mutation(
            warnings=(
                f"gpushare: {names.ANNOTATION_GPU_MEMORY} is set, but no container requests"
                f" {names.NVIDIA_GPU_RESOURCE} or runs vLLM: the pod is left unchanged",
            )
        )
    container, plan = containers[target], plans[target]
    where = f"container {container['name']}"
    reasons = validation.container_reasons(where, container, gpus=validation.gpu_count(container))
    if reasons:
        return Mutation(reasons=tuple(reasons))
    units = quantities.to_units(requested, settings.unit_bytes)
    result = _patch(
        body,
        index=target,
        plan=plan,
        units=units,
        settings=settings,
        warnings=warnings,
    )
    if settings.backend == "dra":  # the second output: a ResourceClaim (see .dra)
        rewritten = dra.rewrite(
            body,
            result.patch,
            result.warnings,
            index=target,
            units=units,
            settings=settings,
            largest_cuda_total_bytes=largest_cuda_total_bytes,
        )
        if rewritten.refusal is not None:
            return Mutation(reasons=(rewritten.refusal,))
        return Mutation(patch=rewritten.patch, warnings=rewritten.warnings)
    return result


def _target(
    spec: Mapping[str, Any], containers: list[Mapping[str, Any]], plans: list[vllm.Plan]
) -> tuple[int | None, Reason | None]:
    """The index of the container that gets the grant, or why the pod is refused."""
    for init in spec.get("initContainers") or []:
        if validation.gpu_count(init) > 0 or _has_grant(init):
            message = (
                f"init container {init.get('name')} asks for {names.NVIDIA_GPU_RESOURCE}; with"
                f" {names.ANNOTATION_GPU_MEMORY} only one regular container gets the GPU slice:"
                " remove the GPU from the init container"
            )
            return None, Reason("multi-gpu", message)
    if spec.get("nodeName"):
        message = (
            "the pod sets spec.nodeName and so bypasses the scheduler, which picks the card for a"
            f" {names.ANNOTATION_GPU_MEMORY} grant: remove nodeName (use a nodeSelector instead)"
        )
        return None, Reason("node-name", message)
    holders = [
        index
        for index, container in enumerate(containers)
        if validation.gpu_count(container) > 0 or _has_grant(container)
    ]
    servers = [index for index, plan in enumerate(plans) if plan.runs_vllm]
    if len(holders) > 1:
        listed = ", ".join(str(containers[index]["name"]) for index in holders)
        message = (
            f"containers {listed} all ask for a GPU; with {names.ANNOTATION_GPU_MEMORY} one"
            " container gets the slice: keep nvidia.com/gpu on the one that uses it"
        )
        return None, Reason("multi-gpu", message)
    if not holders:
        return (servers[0], None) if len(servers) == 1 else (None, None)
    target = holders[0]
    others = [index for index in servers if index != target]
    if others:
        message = (
            f"container {containers[others[0]]['name']} runs vLLM but container"
            f" {containers[target]['name']} holds the GPU: put nvidia.com/gpu on the vLLM container"
        )
        return None, Reason("gpu-elsewhere", message)
    problem = plans[target].problem
    if problem is not None:
        return None, Reason("shell", f"container {containers[target]['name']}: {problem}")
    return target, None


def _patch(
    body: Mapping[str, Any],
    *,
    index: int,
    plan: vllm.Plan,
    units: int,
    settings: config.Settings,
    warnings: list[str],
) -> Mutation:
    spec: Mapping[str, Any] = body["spec"]
    container: Mapping[str, Any] = spec["containers"][index]
    name = container["name"]
    base = f"/spec/containers/{index}"
    ops: list[dict[str, Any]] = []
    notes = list(warnings)

    resources = _resources(container.get("resources") or {}, units)
    if resources != container.get("resources"):
        ops.append(_add(f"{base}/resources", resources))
        size = quantities.format_bytes(units * settings.unit_bytes)
        notes.append(
            f"gpushare: container {name}: {names.NVIDIA_GPU_RESOURCE} replaced by"
            f" {names.RESOURCE_GPU_MEMORY}: {units} ({size})"
        )
    if plan.runs_vllm:
        changed = False
        for key, value in (("command", plan.command), ("args", plan.args)):
            if value is not None and value != container.get(key):
                ops.append(_add(f"{base}/{key}", value))
                changed = True
        if changed:
            replaced = " ".join(plan.removed)
            what = f"{replaced!r} replaced by" if replaced else "added"
            notes.append(
                f"gpushare: container {name} runs vLLM ({plan.how}): {what}"
                f" {names.VLLM_UTILIZATION_ARG}"
            )
    scheduler = settings.webhook.scheduler_name
    current = spec.get("schedulerName")
    if current != scheduler:
        ops.append(_add("/spec/schedulerName", scheduler))
        notes.append(f"gpushare: schedulerName {current or _DEFAULT_SCHEDULER} -> {scheduler}")
    annotations: Mapping[str, Any] = body["metadata"]["annotations"]
    if annotations.get(names.ANNOTATION_MUTATED) != str(units):
        ops.append(_add(f"/metadata/annotations/{_escape(names.ANNOTATION_MUTATED)}", str(units)))
    return Mutation(patch=tuple(ops), warnings=tuple(notes) if ops else ())


def _resources(resources: Mapping[str, Any], units: int) -> dict[str, Any]:
    """``resources`` with ``nvidia.com/gpu`` replaced by the grant, in limits and requests."""
    result = dict(resources)
    for kind in ("limits", "requests"):
        values = {
            key: value
            for key, value in (resources.get(kind) or {}).items()
            if key != names.NVIDIA_GPU_RESOURCE
        }
        values[names.RESOURCE_GPU_MEMORY] = str(units)
        result[kind] = values
    return result


def _has_grant(container: Mapping[str, Any]) -> bool:
    resources = container.get("resources") or {}
    return any(
        names.RESOURCE_GPU_MEMORY in (resources.get(kind) or {}) for kind in ("limits", "requests")
    )


def _add(path: str, value: Any) -> dict[str, Any]:
    """A JSON-patch ``add``: creates the member or replaces it (RFC 6902, 4.1)."""
    return {"op": "add", "path": path, "value": value}


def _escape(token: str) -> str:
    """A JSON-pointer reference token (RFC 6901): ``~`` → ``~0``, ``/`` → ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def _refuse(code: str, message: str) -> Mutation:
    return Mutation(reasons=(Reason(code, message),))


def _malformed(body: Mapping[str, Any]) -> str | None:
    """What is wrong with the pod's shape, for the fields the mutation reads."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return "metadata must be an object"
    annotations = metadata.get("annotations")
    if annotations is not None and not isinstance(annotations, Mapping):
        return "metadata.annotations must be an object"
    if not isinstance(annotations, Mapping) or names.ANNOTATION_GPU_MEMORY not in annotations:
        return None
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        return "spec must be an object"
    if not isinstance(spec.get("schedulerName", ""), str):
        return "spec.schedulerName must be a string"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return "spec.containers must be a non-empty list"
    for field in ("initContainers",):
        if not isinstance(spec.get(field) or [], list):
            return f"spec.{field} must be a list"
    for group in ("containers", "initContainers"):
        for position, container in enumerate(spec.get(group) or []):
            problem = _container_shape(container)
            if problem is not None:
                return f"spec.{group}[{position}]: {problem}"
    return None


def _container_shape(container: object) -> str | None:
    if not isinstance(container, Mapping):
        return "a container must be an object"
    if not isinstance(container.get("name"), str):
        return "name must be a string"
    for key in ("command", "args"):
        value = container.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            return f"{key} must be a list of strings"
    resources = container.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping):
            return "resources must be an object"
        for kind in ("limits", "requests"):
            if not isinstance(resources.get(kind) or {}, Mapping):
                return f"resources.{kind} must be an object"
    env = container.get("env")
    if env is not None and not (
        isinstance(env, list) and all(isinstance(item, Mapping) for item in env)
    ):
        return "env must be a list of objects"
    return None
