"""kube-scheduler's extender protocol as Go spells it (``k8s.io/kube-scheduler/extender/v1``).

The Go types carry no ``json`` tags, so their fields travel under their Go names (``Pod``,
``NodeNames``, ``FailedNodes``, ``Host``...) and every field is always present (a nil slice or
map is ``null``). The objects inside them (``Pod``, ``NodeList``) are Kubernetes objects with the
API's own camelCase names: a ``NodeList`` is ``{"metadata": ..., "items": [...]}``.

Inputs are validated with pydantic: a malformed request is refused with a reason, never half-read.
Only the fields the extender uses are modelled; the rest of a Pod is ignored. Outputs are built
without validation (:meth:`pydantic.BaseModel.model_construct`, ``TypedDict``) and serialized in
one pass, because a filter answer may name thousands of nodes.
"""

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Generic, TypeVar

import pydantic

from gpushare.core import errors
from gpushare.scheduler.candidates import Candidates

__all__ = [
    "Container",
    "ExtenderArgs",
    "ExtenderBindingArgs",
    "ExtenderBindingResult",
    "ExtenderFilterResult",
    "Memo",
    "NodeList",
    "ObjectMeta",
    "Pod",
    "PodSpec",
    "encode",
    "encode_filter_names",
    "parse",
    "parse_args",
]

MAX_NAME_LENGTH: Final = 253
"""A DNS subdomain, the longest name Kubernetes allows for a Node or a Pod."""

NODE_NAME: Final = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
"""A Node's name is a DNS subdomain: the apiserver refuses others."""

Name = Annotated[str, pydantic.StringConstraints(max_length=MAX_NAME_LENGTH)]
NodeName = Annotated[str, pydantic.StringConstraints(max_length=MAX_NAME_LENGTH, pattern=NODE_NAME)]
_NODE_NAME: Final = re.compile(NODE_NAME)


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


def _none_to_empty(value: object) -> object:
    # Go's encoder writes a nil map or slice as null.
    return {} if value is None else value


def _none_to_list(value: object) -> object:
    return [] if value is None else value


Quantity = str | int | float
StrMap = Annotated[dict[str, str], pydantic.BeforeValidator(_none_to_empty)]
QuantityMap = Annotated[dict[str, Quantity], pydantic.BeforeValidator(_none_to_empty)]


# --- Kubernetes objects (camelCase, as the API writes them) -------------------------------------


class OwnerReference(_Model):
    kind: str = ""
    name: str = ""
    controller: bool | None = None


class ObjectMeta(_Model):
    name: Name = ""
    namespace: Name = ""
    uid: str = ""
    labels: StrMap = {}
    annotations: StrMap = {}
    owner_references: Annotated[list[OwnerReference], pydantic.BeforeValidator(_none_to_list)] = (
        pydantic.Field(default=[], alias="ownerReferences")
    )
    deletion_timestamp: str | None = pydantic.Field(default=None, alias="deletionTimestamp")
    resource_version: str = pydantic.Field(default="", alias="resourceVersion")


class ResourceRequirements(_Model):
    limits: QuantityMap = {}
    requests: QuantityMap = {}


class Container(_Model):
    name: str
    resources: Annotated[ResourceRequirements, pydantic.BeforeValidator(_none_to_empty)] = (
        ResourceRequirements()
    )


Containers = Annotated[list[Container], pydantic.BeforeValidator(_none_to_list)]


class PodSpec(_Model):
    containers: Containers = []
    init_containers: Containers = pydantic.Field(default=[], alias="initContainers")
    node_name: str = pydantic.Field(default="", alias="nodeName")
    scheduler_name: str = pydantic.Field(default="", alias="schedulerName")
    priority: int | None = None
    """Set by the Priority admission plugin from the pod's PriorityClass (none: 0)."""


class PodStatus(_Model):
    phase: str = ""


class Pod(_Model):
    """The parts of a ``v1.Pod`` the extender reads."""

    metadata: ObjectMeta
    spec: PodSpec = PodSpec()
    status: Annotated[PodStatus, pydantic.BeforeValidator(_none_to_empty)] = PodStatus()


class NodeList(_Model):
    """A ``v1.NodeList``; nodes stay raw so that a filter answer returns them unchanged."""

    items: Annotated[list[dict[str, Any]], pydantic.BeforeValidator(_none_to_list)] = []

    def names(self) -> list[str]:
        """Each node's ``metadata.name``; raises :class:`BadRequest` for a node without one."""
        result = []
        for position, item in enumerate(self.items):
            meta = item.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name, str) or not name:
                raise errors.BadRequest(f"Nodes.items[{position}] has no metadata.name")
            if len(name) > MAX_NAME_LENGTH or not _NODE_NAME.match(name):
                raise errors.BadRequest(f"Nodes.items[{position}]: {name!r} is not a node name")
            result.append(name)
        return result


# --- The extender protocol (Go field names) ------------------------------------------------------


class ExtenderArgs(_Model):
    """What kube-scheduler sends to ``filter`` and ``prioritize``."""

    pod: Pod = pydantic.Field(alias="Pod")
    nodes: NodeList | None = pydantic.Field(default=None, alias="Nodes")
    """Set when the extender is not ``nodeCacheCapable``."""
    node_names: list[Name] | None = pydantic.Field(default=None, alias="NodeNames")
    """Set when the extender is ``nodeCacheCapable``."""

    def candidates(self) -> list[str]:
        """The candidate node names, from whichever form was sent."""
        if self.node_names is not None:
            return self.node_names
        if self.nodes is not None:
            return self.nodes.names()
        raise errors.BadRequest("the request has neither NodeNames nor Nodes")


class ExtenderFilterResult(_Model):
    """The answer to ``filter``: the nodes that pass and, for the others, why not."""

    nodes: dict[str, Any] | None = pydantic.Field(default=None, alias="Nodes")
    node_names: list[str] | None = pydantic.Field(default=None, alias="NodeNames")
    failed_nodes: dict[str, str] = pydantic.Field(default_factory=dict, alias="FailedNodes")
    failed_and_unresolvable_nodes: dict[str, str] = pydantic.Field(
        default_factory=dict, alias="FailedAndUnresolvableNodes"
    )
    """Nodes where preemption cannot help either."""
    error: str = pydantic.Field(default="", alias="Error")


class ExtenderBindingArgs(_Model):
    """What kube-scheduler sends to ``bind``."""

    pod_name: Annotated[Name, pydantic.StringConstraints(min_length=1)] = pydantic.Field(
        alias="PodName"
    )
    pod_namespace: Annotated[Name, pydantic.StringConstraints(min_length=1)] = pydantic.Field(
        alias="PodNamespace"
    )
    pod_uid: str = pydantic.Field(default="", alias="PodUID")
    node: NodeName = pydantic.Field(alias="Node")


class ExtenderBindingResult(_Model):
    error: str = pydantic.Field(default="", alias="Error")


class MetaPod(_Model):
    uid: str = pydantic.Field(alias="UID")


class MetaVictims(_Model):
    """Victims on one node by UID, the form a ``nodeCacheCapable`` extender is sent and answers."""

    pods: Annotated[list[MetaPod], pydantic.BeforeValidator(_none_to_list)] = pydantic.Field(
        default=[], alias="Pods"
    )
    num_pdb_violations: int = pydantic.Field(default=0, alias="NumPDBViolations")


class Victims(_Model):
    """Victims on one node as whole pods, the form an extender without a node cache is sent."""

    pods: Annotated[list[Pod], pydantic.BeforeValidator(_none_to_list)] = pydantic.Field(
        default=[], alias="Pods"
    )
    num_pdb_violations: int = pydantic.Field(default=0, alias="NumPDBViolations")


class ExtenderPreemptionArgs(_Model):
    """What kube-scheduler sends to ``preempt``: the preemptor and its victims per node."""

    pod: Pod = pydantic.Field(alias="Pod")
    node_name_to_victims: Annotated[
        dict[str, Victims], pydantic.BeforeValidator(_none_to_empty)
    ] = pydantic.Field(default={}, alias="NodeNameToVictims")
    node_name_to_meta_victims: Annotated[
        dict[str, MetaVictims], pydantic.BeforeValidator(_none_to_empty)
    ] = pydantic.Field(default={}, alias="NodeNameToMetaVictims")

    def victims(self) -> dict[str, MetaVictims]:
        """The victims per node by UID, from whichever form was sent."""
        by_uid = {
            node: MetaVictims(
                pods=[MetaPod(uid=pod.metadata.uid) for pod in victims.pods],
                num_pdb_violations=victims.num_pdb_violations,
            )
            for node, victims in self.node_name_to_victims.items()
        }
        return {**by_uid, **self.node_name_to_meta_victims}


class ExtenderPreemptionResult(_Model):
    """The answer to ``preempt``: the nodes where preemption may go on, and their victims."""

    node_name_to_meta_victims: dict[str, MetaVictims] = pydantic.Field(
        default={}, alias="NodeNameToMetaVictims"
    )


def encode_filter_names(
    passed: Candidates | None,
    failed: Mapping[str, str],
    unresolvable: Mapping[str, str],
    *,
    error: str = "",
) -> bytes:
    """An ``ExtenderFilterResult`` of the ``NodeNames`` form, reusing the names' JSON.

    ``passed=None`` writes ``null``: no decision at all (with ``error`` saying why).
    """
    return b"".join(
        (
            b'{"Nodes":null,"NodeNames":',
            b"null" if passed is None else passed.json(),
            b',"FailedNodes":',
            _STR_MAP.dump_json(dict(failed)),
            b',"FailedAndUnresolvableNodes":',
            _STR_MAP.dump_json(dict(unresolvable)),
            b',"Error":',
            json.dumps(error).encode(),
            b"}",
        )
    )


def encode(result: pydantic.BaseModel) -> bytes:
    """A result in Go's field names, every field present."""
    return result.__pydantic_serializer__.to_json(result, by_alias=True)


M = TypeVar("M", bound=pydantic.BaseModel)


def parse(model: type[M], body: bytes) -> M:
    """Validate a request body; raise :class:`BadRequest` naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise errors.BadRequest(f"{model.__name__}: {where}: {first['msg']}{more}") from exc


V = TypeVar("V")

NAMES_KEPT: Final = 64
"""Candidate lists remembered per extender: a few per pod size in flight is plenty."""
PODS_KEPT: Final = 16
"""Pods remembered: a pod's filter and prioritize calls carry the same bytes before its names."""


class Recent(Generic[V]):
    """Values by the raw bytes they were parsed from, least recently used dropped first.

    The two latest are compared first: a comparison of equal bytes is cheaper than hashing a
    new copy of them, and calls alternate between two lists (all nodes, and those that passed).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._values: OrderedDict[bytes, V] = OrderedDict()
        self._latest: list[tuple[bytes, V]] = []

    def get(self, raw: bytes) -> V | None:
        for known, value in self._latest:
            if known == raw:
                self._values.move_to_end(known)  # the stored key: its hash is known
                return value
        found = self._values.get(raw)
        if found is not None:
            self._values.move_to_end(raw)
            self._note(raw, found)
        return found

    def put(self, raw: bytes, value: V) -> None:
        for known, _ in self._latest:
            if known is raw:
                return
        self._values[raw] = value
        self._values.move_to_end(raw)
        if len(self._values) > self._size:
            dropped, _ = self._values.popitem(last=False)
            self._latest = [entry for entry in self._latest if entry[0] is not dropped]
        self._note(raw, value)

    def _note(self, raw: bytes, value: V) -> None:
        self._latest = [(raw, value), *self._latest[:1]]

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class Memo:
    """What one extender parsed recently (see :func:`parse_args`)."""

    names: Recent[Candidates] = field(default_factory=lambda: Recent(NAMES_KEPT))
    """Candidate lists, including those the extender answered filter calls with."""
    heads: Recent["ExtenderArgs"] = field(default_factory=lambda: Recent(PODS_KEPT))
    """Calls parsed without their names: the pod, mostly."""

    def remember(self, candidates: Candidates) -> None:
        """Keep a list under its JSON, as a later call will name it."""
        self.names.put(candidates.json(), candidates)


_NAMES_KEY: Final = b'"NodeNames":'
_NAMES: Final = pydantic.TypeAdapter(list[Name])
_STR_MAP: Final = pydantic.TypeAdapter(dict[str, str])


def parse_args(body: bytes, memo: Memo | None = None) -> tuple[ExtenderArgs, Candidates]:
    """:func:`parse` for :class:`ExtenderArgs`, and its candidates, reusing what ``memo`` holds.

    When the ``NodeNames`` array is the body's last member, the body is parsed in two parts,
    each looked up in ``memo`` by its raw bytes first: the names, and the rest with ``null`` in
    their place. That split is only trusted when both parts parse and the rest has no other
    ``NodeNames``: any other body is parsed in full, so its errors read as usual.
    """
    memo = memo or Memo()
    split = _split_names(body)
    if split is not None:
        head, raw = split
        known_names = names = memo.names.get(raw)
        known_head = envelope = memo.heads.get(head)
        try:
            if envelope is None:
                envelope = ExtenderArgs.model_validate_json(head + b"null}")
            if names is None:
                names = Candidates(_NAMES.validate_json(raw), raw=raw)
        except pydantic.ValidationError:
            pass
        else:
            if envelope.node_names is None:
                # Only what was parsed now is stored: a hit is already the most recent entry.
                if known_names is None:
                    memo.names.put(raw, names)
                if known_head is None:
                    memo.heads.put(head, envelope)
                args = ExtenderArgs.model_construct(
                    pod=envelope.pod, nodes=envelope.nodes, node_names=names.names
                )
                return args, names
    args = parse(ExtenderArgs, body)
    return args, Candidates(args.candidates())


def _split_names(body: bytes) -> tuple[bytes, bytes] | None:
    """The body up to ``"NodeNames":`` and the raw value after it, when that value ends the body."""
    at = body.rfind(_NAMES_KEY)
    if at < 0:
        return None
    end = body.rstrip()
    if not end.endswith(b"}"):
        return None
    start = at + len(_NAMES_KEY)
    raw = end[start:-1].strip()
    if not (raw.startswith(b"[") and raw.endswith(b"]")):
        return None
    return body[:start], raw
