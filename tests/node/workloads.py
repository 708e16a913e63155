"""Workloads of the `node` tests: KServe-shaped predictor Deployments running the vLLM stand-in, and
how to read back what their containers got."""

import asyncio
import contextlib
import copy
import json
import os
import urllib.request
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import config, names
from gpushare.deviceplugin.podresources import Holding, PodResourcesClient
from tests import cluster
from tests.node import runtime
from tests.node.vllm_standin import ENV_NVML

if TYPE_CHECKING:
    from tests.node.local import RealNode
from tests.webhook import builders

NVML_IN_CONTAINER: Final = "/etc/gpushare-test/nvml.yaml"


def predictor(
    name: str, *, image: str, nvml_file: Path, memory: str = "20Gi", replicas: int = 1
) -> dict[str, Any]:
    """The Deployment KServe's controller (raw mode) makes for the seed's vllm/vllm-openai service.

    The seed's container, args and annotation, with what this machine needs instead: the stand-in
    image (present, never pulled), small CPU and memory requests (the node has 2 cores), no model
    storage (no STORAGE_URI, so no storage initializer), and the fake NVML file mounted read-only
    for the stand-in.
    """
    isvc = builders.isvc("isvc-vllm-openai.yaml", memory=memory)
    isvc["metadata"]["name"] = name
    pod = builders.predictor_pod(isvc)
    container = copy.deepcopy(pod["spec"]["containers"][0])
    container["image"] = image
    container["imagePullPolicy"] = "Never"
    container["env"] = [e for e in container.get("env", []) if e["name"] != "STORAGE_URI"]
    container["env"].append({"name": ENV_NVML, "value": NVML_IN_CONTAINER})
    container["resources"] = {
        "limits": {names.NVIDIA_GPU_RESOURCE: "1", "cpu": "200m", "memory": "256Mi"},
        "requests": {names.NVIDIA_GPU_RESOURCE: "1", "cpu": "10m", "memory": "64Mi"},
    }
    container["volumeMounts"] = [{"name": "nvml", "mountPath": NVML_IN_CONTAINER, "readOnly": True}]
    labels = {**pod["metadata"]["labels"], "app": f"{name}-predictor"}
    template = {
        "metadata": {"labels": labels, "annotations": pod["metadata"]["annotations"]},
        "spec": {
            "containers": [container],
            "terminationGracePeriodSeconds": 5,
            "volumes": [{"name": "nvml", "hostPath": {"path": str(nvml_file), "type": "File"}}],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-predictor", "labels": dict(pod["metadata"]["labels"])},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": f"{name}-predictor"}},
            "template": template,
        },
    }


def deploy(
    node: "RealNode", namespace: str, name: str, *, memory: str = "20Gi", replicas: int = 1
) -> dict[str, Any]:
    """Create :func:`predictor` ``name`` on the node's stand-in image and fake card; its body."""
    body = predictor(
        name,
        image=node.images["vllm-standin"],
        nvml_file=node.nvml_file,
        memory=memory,
        replicas=replicas,
    )
    node.cp.rest().create(f"/apis/apps/v1/namespaces/{namespace}/deployments", body)
    return body


def wait_running(node: "RealNode", namespace: str, app: str, count: int) -> list[dict[str, Any]]:
    """Wait until exactly ``count`` pods of ``app`` run; on timeout show the pods, events, logs."""

    def probe() -> list[dict[str, Any]] | None:
        found = pods(node.cp, namespace, app)
        return found if len(found) == count and all(map(running, found)) else None

    try:
        return cluster.wait_for(probe, timeout=180, interval=1, what=f"{count} running pod(s)")
    except TimeoutError as exc:
        state = node.cp.kubectl("get", "pods,events", "-n", namespace, "-o", "wide").stdout
        logs = "\n".join(f"--- {k}\n{v}" for k, v in node.logs().items())
        raise AssertionError(f"{exc}\n{state}\n{logs}") from exc


def pods(cp: cluster.ControlPlane, namespace: str, app: str) -> list[dict[str, Any]]:
    """The Deployment's pods (``app`` label), not being deleted."""
    items = cp.rest().get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"app={app}")
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]


def running(pod: dict[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return bool(statuses) and all("running" in s.get("state", {}) for s in statuses)


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def live_daemons() -> list[Path]:
    """The MPS pipe folders (under the agent's MPS root) whose control daemon runs."""
    live = []
    for pidfile in runtime.MPS_ROOT.glob("*/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text()), 0)
            live.append(pidfile.parent)
    return live


def standin_line(cp: cluster.ControlPlane, namespace: str, pod: str) -> dict[str, Any]:
    """The stand-in's JSON line, from the container's log (kubectl logs, through kubelet), once
    the container has started and written it."""

    def first_line() -> str | None:
        # Not yet started ("waiting to start: ContainerCreating") is an error of kubectl's.
        result = cp.kubectl("logs", "-n", namespace, pod, check=False)
        lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
        return lines[0] if lines else None

    line: dict[str, Any] = json.loads(
        cluster.wait_for(first_line, timeout=60, interval=0.5, what=f"{pod}'s first log line")
    )
    return line


def kubelet_holdings() -> list[Holding]:
    """What kubelet's PodResources API says each container holds of gpushare's resource."""

    async def read() -> list[Holding]:
        client = PodResourcesClient(runtime.KUBELET_DIR / "pod-resources" / "kubelet.sock")
        try:
            return await client.holdings()
        finally:
            await client.close()

    return asyncio.run(read())


def ledger_granted_bytes(node: "RealNode") -> dict[str, int]:
    """Bytes granted per card of the node in the extender's ledger, read from the /metrics of
    every gpushare-scheduler pod (the replicas must agree)."""
    seen: list[dict[str, int]] = []
    for pod in node.system_pods(names.SCHEDULER_NAME):
        url = f"http://{pod['status']['podIP']}:8888/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        granted = {
            sample.labels["card"]: int(sample.value)
            for family in text_string_to_metric_families(text)
            if family.name == "gpushare_scheduler_card_granted_bytes"
            for sample in family.samples
            if sample.labels["node"] == node.name
        }
        seen.append(granted)
    assert seen and all(s == seen[0] for s in seen), seen
    return seen[0]


def holdings_bytes(holdings: list[Holding]) -> int:
    """The card memory that kubelet's device IDs stand for: each container's units and, per
    container, the overhead the shipped configuration counts (one card on the test node)."""
    settings = config.validate({})
    units = Counter(len(h.devices) for h in holdings)
    return sum(
        count * (size * settings.unit_bytes + settings.allocation_overhead_bytes)
        for size, count in units.items()
    )
