"""A rollout (a changed model argument) of a predictor whose card has no room for a second copy:
the surge pod waits, the old one serves on; with ``maxSurge: 0`` the rollout replaces it."""

from typing import Any

import pytest

from tests import cluster
from tests.node import workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)


def test_a_rollout_on_a_full_card_needs_max_surge_zero(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    body = workloads.deploy(real_node, ns, "rolled", memory="48Gi")
    path = f"/apis/apps/v1/namespaces/{ns}/deployments/rolled-predictor"
    [old] = workloads.wait_running(real_node, ns, "rolled-predictor", 1)

    args = body["spec"]["template"]["spec"]["containers"][0]["args"]
    changed = [*args[:-1], "/mnt/models/v2"]
    patch: dict[str, Any] = {
        "spec": {
            "template": {"spec": {"containers": [{"name": "kserve-container", "args": changed}]}}
        }
    }
    cp.rest().patch(path, patch, "strategic")

    def surge_pending() -> dict[str, Any] | None:
        pods = cp.rest().get(f"/api/v1/namespaces/{ns}/pods", labelSelector="app=rolled-predictor")
        waiting = [p for p in pods["items"] if p["metadata"]["name"] != old["metadata"]["name"]]
        if not waiting:
            return None
        conditions = waiting[0]["status"].get("conditions") or []
        unschedulable = any(c.get("reason") == "Unschedulable" for c in conditions)
        return waiting[0] if unschedulable else None

    # The default strategy (maxSurge 25%, so one pod) starts the new pod first: no card has room.
    surge = cluster.wait_for(surge_pending, timeout=60, interval=1, what="the surge pod to wait")
    assert not surge["spec"].get("nodeName")
    assert workloads.running(
        cp.rest().get(f"/api/v1/namespaces/{ns}/pods/{old['metadata']['name']}")
    )

    # maxSurge 0 (maxUnavailable 1): the old pod goes first, the new one takes its memory.
    strategy = {"spec": {"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}}
    cp.rest().patch(path, strategy, "strategic")

    def replaced() -> list[dict[str, Any]] | None:
        pods = workloads.pods(cp, ns, "rolled-predictor")
        fresh = [p for p in pods if "/mnt/models/v2" in p["spec"]["containers"][0]["args"]]
        return fresh if len(pods) == 1 and fresh and workloads.running(fresh[0]) else None

    try:
        [new] = cluster.wait_for(replaced, timeout=180, interval=1, what="the rollout to finish")
    except TimeoutError as exc:
        state = cp.kubectl("get", "pods,replicasets,events", "-n", ns, "-o", "wide").stdout
        logs = "\n".join(f"--- {k}\n{v}" for k, v in real_node.logs().items())
        raise AssertionError(f"{exc}\n{state}\n{logs}") from exc
    line = workloads.standin_line(cp, ns, new["metadata"]["name"])
    assert line["result"] == "started", line
    assert "/mnt/models/v2" in line["argv"]
