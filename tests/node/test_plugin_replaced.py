"""The device plugin's pod replaced under running predictors (a DaemonSet rollout, an eviction):
the new pod registers again, the running container keeps its grant, nothing is granted twice, and
kubelet's PodResources, the checkpoint and the extender's ledger agree."""

import pytest

from tests import cluster
from tests.node import local, workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)


def test_a_replaced_device_plugin_pod_keeps_grants_and_grants_nothing_twice(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    workloads.deploy(real_node, ns, "kept", memory="30Gi")
    [before] = workloads.wait_running(real_node, ns, "kept-predictor", 1)
    held = {(h.namespace, h.name): h.devices for h in workloads.kubelet_holdings()}
    kept_ids = set(held[ns, before["metadata"]["name"]])
    assert len(kept_ids) == 30
    [pipe] = workloads.live_daemons()

    local.replace_agent(real_node)

    [after] = workloads.wait_running(real_node, ns, "kept-predictor", 1)
    status, earlier = (
        after["status"]["containerStatuses"][0],
        before["status"]["containerStatuses"][0],
    )
    assert status["containerID"] == earlier["containerID"]
    assert status["restartCount"] == 0
    # Its MPS daemon runs in the same pipe folder: adopted where it outlived the old pod (cgroup
    # v2), started again by the new plugin where it ended with it (cgroup v1).
    cluster.wait_for(
        lambda: workloads.live_daemons() == [pipe],
        timeout=60,
        interval=1,
        what="the kept daemon to run",
    )

    # 40 GiB beside the 30 fit on the 79 GiB card; the new plugin hands out none of the 30's IDs.
    workloads.deploy(real_node, ns, "beside", memory="40Gi")
    [pod] = workloads.wait_running(real_node, ns, "beside-predictor", 1)
    line = workloads.standin_line(cp, ns, pod["metadata"]["name"])
    assert line["result"] == "started", line
    held = {(h.namespace, h.name): h.devices for h in workloads.kubelet_holdings()}
    beside_ids = set(held[ns, pod["metadata"]["name"]])
    assert len(beside_ids) == 40
    assert not beside_ids & kept_ids
    assert set(held[ns, after["metadata"]["name"]]) == kept_ids

    # What is left (about 9 GiB) is too little for 12: the 30 were not forgotten.
    workloads.deploy(real_node, ns, "late", memory="12Gi")

    def waiting() -> bool:
        pods = workloads.pods(cp, ns, "late-predictor")
        conditions = [c for p in pods for c in p["status"].get("conditions") or []]
        return any(c.get("reason") == "Unschedulable" for c in conditions)

    cluster.wait_for(waiting, timeout=60, interval=1, what="the 12 GiB pod to wait for room")

    # kubelet's view and the extender's ledger agree on what the card holds.
    [granted] = workloads.ledger_granted_bytes(real_node).values()
    assert granted == workloads.holdings_bytes(workloads.kubelet_holdings())
