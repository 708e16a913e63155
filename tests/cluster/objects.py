"""Objects as kube-controller-manager, kubelet and the agent would write them: namespaces with
their ServiceAccount, GPU nodes with their report, and their clean-up."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gpushare.core import names, quantities
from gpushare.core.nodereport import CardReport, NodeReport
from gpushare.simulator.controlplane.rest import ApiError, Rest
from tests.cluster.plane import ControlPlane, ensure_service_account, pinned_versions

LABEL_OWNER: Final = "tests.gpushare.io/owner"
"""Nodes labelled with a test namespace's name go with :func:`cleanup_namespace`."""

Target = ControlPlane | Rest
"""Helpers act as admin on a ControlPlane, or with the credentials of the Rest client given."""


def _rest(target: Target) -> Rest:
    return target.rest() if isinstance(target, ControlPlane) else target


def unique_name(hint: str, max_len: int = 50) -> str:
    """A DNS-1123 label from ``hint`` plus a random suffix: ``test-foo-bar-3kq9x``."""
    base = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[: max_len - 6].strip("-")
    return f"{base or 'x'}-{secrets.token_hex(3)[:5]}"


def create_namespace(target: Target, name: str, *, labels: Mapping[str, str] | None = None) -> str:
    """Create a namespace and its ``default`` ServiceAccount (no controller-manager runs)."""
    rest = _rest(target)
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    rest.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    ensure_service_account(rest, name, "default")
    return name


def cleanup_namespace(target: Target, name: str) -> None:
    """Force-delete the namespace's pods, delete the Nodes it owns (:data:`LABEL_OWNER`), then the
    namespace itself, without waiting (it stays Terminating: no namespace controller runs)."""
    rest = _rest(target)
    with contextlib.suppress(ApiError):
        rest.delete(f"/api/v1/namespaces/{name}/pods", gracePeriodSeconds=0)
    with contextlib.suppress(ApiError):
        rest.delete("/api/v1/nodes", labelSelector=f"{LABEL_OWNER}={name}")
    with contextlib.suppress(ApiError):
        rest.delete(f"/api/v1/namespaces/{name}", propagationPolicy="Background")


def node_report(cards: Sequence[CardReport], heartbeat: dt.datetime | None = None) -> NodeReport:
    """A report of ``cards`` with a heartbeat of now (or the time given)."""
    return NodeReport(heartbeat=heartbeat or dt.datetime.now(dt.UTC), cards=tuple(cards))


def gpu_card(
    index: int = 0,
    *,
    total: int | str = "80Gi",
    used: int | str = 0,
    model: str = "NVIDIA H100 80GB HBM3",
    reserved: int | str = 0,
    healthy: bool = True,
    uuid: str | None = None,
) -> CardReport:
    """A card for a fake node (sizes in bytes or Kubernetes quantities); free = total - used."""
    total_bytes = quantities.parse_bytes(total)
    used_bytes = quantities.parse_bytes(used)
    return CardReport.model_validate(
        {
            "uuid": uuid or f"GPU-{index:08x}-0000-4000-8000-{secrets.token_hex(6)}",
            "index": index,
            "model": model,
            "total_bytes": total_bytes,
            "reserved_bytes": quantities.parse_bytes(reserved),
            "used_bytes": used_bytes,
            "free_bytes": max(0, total_bytes - used_bytes),
            "healthy": healthy,
        }
    )


def register_gpu_node(
    target: Target,
    name: str,
    cards: Sequence[CardReport],
    *,
    unit_bytes: int = quantities.GI,
    report: NodeReport | str | None = None,
    gpu_units: int | None = None,
    owner: str | None = None,
    labels: Mapping[str, str] | None = None,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: int = 110,
) -> dict[str, Any]:
    """Register a Node as kubelet, the device plugin and the agent would; return it.

    - ``status.capacity``/``allocatable``: cpu, memory, pods, and :data:`names.RESOURCE_GPU_MEMORY`
      = ``gpu_units`` or the sum of each card's whole units (``card_units(total, unit_bytes)``);
    - condition ``Ready=True``, address 127.0.0.1, no taints (the ``not-ready`` taint that
      TaintNodesByCondition adds on create is removed, as the node lifecycle controller would);
    - label :data:`names.LABEL_ENABLED` ``=true``, :data:`LABEL_OWNER` ``=owner`` when given (then
      :func:`cleanup_namespace` of that namespace deletes the node), plus ``labels``;
    - annotation :data:`names.ANNOTATION_NODE_REPORT`: ``report`` if it is a string (raw, e.g.
      malformed on purpose), its ``encode()`` if a NodeReport, else a fresh report of ``cards``.
    """
    if report is None:
        report = node_report(cards)
    encoded = report if isinstance(report, str) else report.encode()
    units = (
        gpu_units
        if gpu_units is not None
        else sum(quantities.card_units(card.total_bytes, unit_bytes) for card in cards)
    )
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        names.LABEL_ENABLED: "true",
    }
    if owner:
        node_labels[LABEL_OWNER] = owner
    node_labels.update(labels or {})
    resources = {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        names.RESOURCE_GPU_MEMORY: str(units),
    }
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status (gpushare test)",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": pinned_versions()[0],
            "kubeProxyVersion": "",
            "bootID": "",
            "machineID": "",
            "systemUUID": "",
            "containerRuntimeVersion": "containerd://2.0.0",
            "kernelVersion": "6.1.0",
            "osImage": "gpushare test node",
        },
    }
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {names.ANNOTATION_NODE_REPORT: encoded},
        },
        "spec": {},
    }
    rest = _rest(target)
    rest.create("/api/v1/nodes", body)
    rest.patch(f"/api/v1/nodes/{name}/status", {"status": status}, "strategic")
    return rest.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}}, "merge")


def set_node_report(target: Target, name: str, report: NodeReport | str) -> dict[str, Any]:
    """Rewrite a node's report annotation, as the agent does on each heartbeat or change."""
    encoded = report if isinstance(report, str) else report.encode()
    patch = {"metadata": {"annotations": {names.ANNOTATION_NODE_REPORT: encoded}}}
    return _rest(target).patch(f"/api/v1/nodes/{name}", patch, "merge")
