"""Objects for the scheduler's tests: cards, node reports, Nodes and Pods as the API holds them."""

import uuid
from datetime import UTC, datetime
from typing import Any

from gpushare.core import config, names, nodereport, quantities
from gpushare.core.ids import CardUUID, NodeName, pod_key
from gpushare.scheduler import demand, ledger

GI = quantities.GI
MI = quantities.MI
SETTINGS = config.validate({})
"""Defaults: 1 GiB units, binpack, ``mps`` isolation (66 MiB per allocation)."""
OVERHEAD = SETTINGS.allocation_overhead_bytes
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def card(
    index: int,
    *,
    total: int = 80 * GI,
    used: int = 0,
    reserved: int = 0,
    healthy: bool = True,
    node: str = "n",
) -> nodereport.CardReport:
    """A card whose UUID says where it is (``GPU-<node>-<index>``); free is what is not used."""
    return nodereport.CardReport(
        uuid=CardUUID(f"GPU-{node}-{index}"),
        index=index,
        model="NVIDIA H100 80GB HBM3" if total > 40 * GI else "NVIDIA L4",
        total_bytes=total,
        reserved_bytes=reserved,
        used_bytes=used,
        free_bytes=max(0, total - reserved - used),
        healthy=healthy,
    )


def report(
    node: str, count: int = 1, *, total: int = 80 * GI, heartbeat: datetime = NOW
) -> nodereport.NodeReport:
    return nodereport.NodeReport(
        heartbeat=heartbeat,
        cards=tuple(card(i, total=total, node=node) for i in range(count)),
    )


def new_ledger(*, overhead: int = OVERHEAD, timeout: float = 300.0) -> ledger.Ledger:
    """A ledger whose clock stands at :data:`NOW`."""
    return ledger.Ledger(
        overhead_bytes=overhead, heartbeat_timeout_seconds=timeout, clock=NOW.timestamp
    )


def request(
    units: int, *, uid: str | None = None, name: str = "p", **more: int
) -> demand.PodRequest:
    """A pod request: one container of ``units`` GiB, plus containers named in ``more``."""
    demands = [demand.Demand("main", units, units * GI)]
    demands += [demand.Demand(c, n, n * GI) for c, n in more.items()]
    return demand.PodRequest(uid or str(uuid.uuid4()), pod_key("ns", name), tuple(demands))


def pod(
    name: str,
    units: int | str,
    *,
    namespace: str = "ns",
    uid: str | None = None,
    node: str | None = None,
    annotations: dict[str, str] | None = None,
    scheduler: str = names.SCHEDULER_NAME,
    extra_containers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A Pod as the webhook leaves it: schedulerName, the resource in units, the annotation."""
    containers = [_container("kserve-container", units)]
    containers += [_container(c, n) for c, n in (extra_containers or {}).items()]
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": {
            names.ANNOTATION_GPU_MEMORY: f"{units}Gi",
            names.ANNOTATION_MUTATED: str(units),
            **(annotations or {}),
        },
    }
    if uid is not None:
        metadata["uid"] = uid
    spec: dict[str, Any] = {"schedulerName": scheduler, "containers": containers}
    if node is not None:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _container(name: str, units: int | str) -> dict[str, Any]:
    return {
        "name": name,
        "image": "vllm/vllm-openai:latest",
        "args": ["--model", "/mnt/models", names.VLLM_UTILIZATION_ARG],
        "resources": {"limits": {names.RESOURCE_GPU_MEMORY: str(units)}},
    }


def node(name: str, rep: nodereport.NodeReport | str | None) -> dict[str, Any]:
    """A Node object carrying the agent's report (raw text when a string)."""
    annotations = {}
    if rep is not None:
        annotations[names.ANNOTATION_NODE_REPORT] = rep if isinstance(rep, str) else rep.encode()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {names.LABEL_ENABLED: "true"},
            "annotations": annotations,
        },
    }


def node_name(text: str) -> NodeName:
    return NodeName(text)
