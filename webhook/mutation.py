"""The Pod mutation: a pod carrying ``gpushare.io/gpu-memory`` becomes a shared-GPU pod. Pure.

The one container that holds the GPU (``nvidia.com/gpu``, or a grant set by hand) gets
``gpushare.io/gpu-memory: <units>`` in place of ``nvidia.com/gpu``; if it is shown to run vLLM
(:mod:`.vllm`), its command line gets :data:`gpushare.core.names.VLLM_UTILIZATION_ARG` in place of
any user value; otherwise a warning says that nothing sizes the server to the grant. A pod in which
no container asks for a GPU is left as it is (KServe copies the annotation to a transformer's
CPU pods too). The pod gets gpushare's ``schedulerName`` and the
:data:`gpushare.core.names.ANNOTATION_MUTATED` mark. The result is a JSON patch (RFC 6902) computed
from the pod as it is, so a mutated pod yields an empty patch: re-invocation
(``reinvocationPolicy: IfNeeded``) changes nothing.

Refused: system annotations set by hand (the mark excepted: it is the webhook's own on
re-invocation) and near misses of the user's; environment that would override what the device
plugin sets (see :func:`.validation.environment_reasons`), in any container; NVIDIA resources
other than ``nvidia.com/gpu``; several GPU containers or GPU init containers; ``nodeName``; and,
on the GPU container, what :func:`.validation.container_reasons` refuses.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpushare.core import config, names, quantities
from gpushare.webhook import dra, validation, vllm
from gpushare.webhook.validation import Reason

_DEFAULT_SCHEDULER: Final = "default-scheduler"
_OURS: Final = frozenset({names.ANNOTATION_MUTATED})


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
    reasons = validation.annotation_keys(annotations, ours=_OURS)
    if names.ANNOTATION_GPU_MEMORY not in annotations:
        return Mutation(reasons=tuple(reasons))
    if settings.backend == "dra" and dra.holds_claim(body):
        return Mutation(reasons=tuple(reasons))
    requested, more, warnings = validation.memory_bytes(
        annotations[names.ANNOTATION_GPU_MEMORY],
        settings=settings,
        largest_cuda_total_bytes=largest_cuda_total_bytes,
    )
    reasons += more
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
        return Mutation(warnings=(_unchanged(containers, plans),))
    for group in ("initContainers", "containers"):
        for other in spec.get(group) or []:
            where = f"container {other['name']}"
            reasons += validation.other_gpu_reasons(where, other)
            refused, warned = validation.environment_reasons(where, other)
            reasons += refused
            warnings += warned
    container, plan = containers[target], plans[target]
    where = f"container {container['name']}"
    gpus = validation.gpu_count(container)
    reasons += validation.container_reasons(where, container, gpus=gpus, holder=True)
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
    """The index of the container that gets the grant (``None``: none asks for a GPU), or why
    the pod is refused."""
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
    if len(holders) > 1:
        listed = ", ".join(str(containers[index]["name"]) for index in holders)
        message = (
            f"containers {listed} all ask for a GPU; with {names.ANNOTATION_GPU_MEMORY} one"
            " container gets the slice: keep nvidia.com/gpu on the one that uses it"
        )
        return None, Reason("multi-gpu", message)
    if not holders:
        return None, None
    target = holders[0]
    others = [i for i, plan in enumerate(plans) if plan.runs_vllm and i != target]
    if others:
        message = (
            f"container {containers[others[0]]['name']} runs vLLM but container"
            f" {containers[target]['name']} holds the GPU: put nvidia.com/gpu on the vLLM container"
        )
        return None, Reason("gpu-elsewhere", message)
    return target, None


def _unchanged(containers: list[Mapping[str, Any]], plans: list[vllm.Plan]) -> str:
    """The warning for an annotated pod in which no container asks for a GPU."""
    servers = [str(c["name"]) for c, plan in zip(containers, plans, strict=True) if plan.runs_vllm]
    head = f"gpushare: {names.ANNOTATION_GPU_MEMORY} is set, but"
    if not servers:
        return (
            f"{head} no container requests {names.NVIDIA_GPU_RESOURCE}: the pod is left unchanged"
            " (a CPU pod, such as KServe's transformer, needs no slice)"
        )
    if len(servers) == 1:
        return (
            f"{head} container {servers[0]}, which runs vLLM, requests no"
            f" {names.NVIDIA_GPU_RESOURCE}: the pod is left unchanged; to share a card, give it"
            f" {names.NVIDIA_GPU_RESOURCE}: 1"
        )
    return (
        f"{head} containers {', '.join(servers)} run vLLM and none requests"
        f" {names.NVIDIA_GPU_RESOURCE}: the pod is left unchanged; one container of a pod gets a"
        f" slice: give {names.NVIDIA_GPU_RESOURCE}: 1 to that one"
    )


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

    current = container.get("resources") or {}
    for kind in ("limits", "requests"):
        preset = (current.get(kind) or {}).get(names.RESOURCE_GPU_MEMORY)
        if preset is not None and str(preset) != str(units):
            notes.append(
                f"gpushare: container {name}: resources.{kind} {names.RESOURCE_GPU_MEMORY}:"
                f" {preset} is replaced by {units}: the annotation {names.ANNOTATION_GPU_MEMORY}"
                " decides the grant"
            )
    resources = _resources(current, units)
    if resources != container.get("resources"):
        ops.append(_add(f"{base}/resources", resources))
        size = quantities.format_bytes(units * settings.unit_bytes)
        notes.append(
            f"gpushare: container {name}: {names.NVIDIA_GPU_RESOURCE} replaced by"
            f" {names.RESOURCE_GPU_MEMORY}: {units} ({size})"
        )
    if not plan.runs_vllm and ops:
        size = quantities.format_bytes(units * settings.unit_bytes)
        notes.append(
            f"gpushare: container {name} gets {size}, but gpushare sees no vLLM server in its"
            " command, args or image, so nothing sizes the server to the grant: make it use at"
            f" most {size} of GPU memory itself"
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
    if env is not None:
        if not isinstance(env, list):
            return "env must be a list"
        for position, item in enumerate(env):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                return f"env[{position}] must be an object whose name is a string"
    sources = container.get("envFrom")
    if sources is not None:
        if not isinstance(sources, list):
            return "envFrom must be a list"
        for position, item in enumerate(sources):
            if not isinstance(item, Mapping) or not isinstance(item.get("prefix", ""), str):
                return f"envFrom[{position}] must be an object whose prefix is a string"
            for ref in ("configMapRef", "secretRef"):
                if not isinstance(item.get(ref) or {}, Mapping):
                    return f"envFrom[{position}].{ref} must be an object"
    if not isinstance(container.get("image", ""), str):
        return "image must be a string"
    return None
