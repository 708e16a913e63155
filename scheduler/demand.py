"""What a pod asks of the GPUs: one demand per container that requests ``gpushare.io/gpu-memory``.

The resource (a count of units, set by the webhook) is the truth: kubelet hands the container that
many device IDs of one card. The user's ``gpushare.io/gpu-memory`` annotation is not read here; a
pod without the resource never reaches the extender (``managedResources``). Each container gets a
card of its own choosing, so a pod with two such containers holds two allocations (possibly on the
same card).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gpushare.core import errors, names, placement, quantities
from gpushare.core.ids import PodKey, pod_key
from gpushare.scheduler import wire

__all__ = ["Demand", "PodRequest", "from_pod", "policy_of"]

TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})
"""A pod in these phases has stopped its containers and holds no memory."""


@dataclass(frozen=True, slots=True)
class Demand:
    """One container's request."""

    container: str
    units: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Revision:
    """A Deployment's revision: its ReplicaSets are named ``<deployment>-<pod-template-hash>``."""

    deployment: str
    template_hash: str


@dataclass(frozen=True, slots=True)
class PodRequest:
    """Everything the extender needs to place a pod, keyed by the pod's UID."""

    uid: str
    key: PodKey
    demands: tuple[Demand, ...]
    policy: placement.Policy | None = None
    """The pod's own policy (annotation :data:`names.ANNOTATION_POLICY`), if it names one."""
    priority: int = 0
    """The pod's priority (``spec.priority``): preemption evicts only pods below its preemptor."""
    revision: Revision | None = None
    """Which Deployment revision the pod belongs to, when a ReplicaSet controls it."""

    @property
    def namespace(self) -> str:
        return self.key.partition("/")[0]

    @property
    def name(self) -> str:
        return self.key.partition("/")[2]

    @property
    def total_bytes(self) -> int:
        return sum(demand.bytes for demand in self.demands)


def from_pod(pod: wire.Pod, *, unit_bytes: int, read_policy: bool = True) -> PodRequest:
    """The pod's request; raises :class:`BadRequest` saying what is wrong and what to write.

    ``read_policy=False`` ignores the policy annotation: a bound pod's placement is done, and a
    bad annotation written later must not hide the memory it holds.
    """
    for container in pod.spec.init_containers:
        if _quantity(container) is not None:
            raise errors.BadRequest(
                f"init container {container.name!r} requests {names.RESOURCE_GPU_MEMORY}; only"
                " regular containers can hold GPU memory: move the request to a container"
            )
    demands = []
    for container in pod.spec.containers:
        value = _quantity(container)
        if value is None:
            continue
        count = _units(container.name, value)
        if count:
            demands.append(Demand(container.name, count, count * unit_bytes))
    meta = pod.metadata
    return PodRequest(
        uid=meta.uid,
        key=pod_key(meta.namespace, meta.name),
        demands=tuple(demands),
        policy=policy_of(meta.annotations) if read_policy else None,
        priority=pod.spec.priority or 0,
        revision=revision_of(meta),
    )


def revision_of(meta: wire.ObjectMeta) -> Revision | None:
    """The revision of a pod a ReplicaSet controls (from its owner and ``pod-template-hash``)."""
    template_hash = meta.labels.get(names.LABEL_POD_TEMPLATE_HASH)
    if not template_hash:
        return None
    for owner in meta.owner_references:
        if owner.controller and owner.kind == "ReplicaSet":
            deployment = owner.name.removesuffix(f"-{template_hash}")
            if deployment != owner.name:
                return Revision(deployment, template_hash)
    return None


def policy_of(annotations: Mapping[str, str]) -> placement.Policy | None:
    """The policy the pod asks for, or ``None``; raises :class:`BadRequest` for an unknown one."""
    value = annotations.get(names.ANNOTATION_POLICY)
    if value is None:
        return None
    for policy in placement.POLICIES:
        if value.strip() == policy:
            return policy
    allowed = ", ".join(placement.POLICIES[:-1]) + f" or {placement.POLICIES[-1]}"
    raise errors.BadRequest(
        f"annotation {names.ANNOTATION_POLICY}={value!r} is not a policy: write {allowed}"
    )


def _quantity(container: wire.Container) -> wire.Quantity | None:
    resources = container.resources
    limit = resources.limits.get(names.RESOURCE_GPU_MEMORY)
    return limit if limit is not None else resources.requests.get(names.RESOURCE_GPU_MEMORY)


def _units(container: str, value: wire.Quantity) -> int:
    wrong = errors.BadRequest(
        f"container {container!r}: {names.RESOURCE_GPU_MEMORY}={value!r} is not a whole number of"
        ' units: write a count such as "20"'
    )
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)  # the apiserver's canonical form; skips the general parser
    if isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    try:
        # The apiserver refuses fractional extended resources, so rounding up never applies.
        return quantities.parse_bytes(value)
    except errors.QuantityError as exc:
        raise wrong from exc
