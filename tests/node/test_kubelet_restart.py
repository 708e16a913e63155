"""kubelet restarts under a running predictor: the device plugin registers again, the container
keeps its grant, and kubelet's checkpoint, its PodResources API and the extender's ledger agree."""

import json
from typing import Any

import pytest

from gpushare.core import names
from tests import cluster
from tests.node import runtime, workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)

CHECKPOINT = runtime.KUBELET_DIR / "device-plugins" / "kubelet_internal_checkpoint"


def checkpoint_devices(pod_uid: str) -> list[str]:
    """The device IDs of ``pod_uid`` in kubelet's device-manager checkpoint."""
    data: dict[str, Any] = json.loads(CHECKPOINT.read_text())
    devices: list[str] = []
    for entry in data["Data"]["PodDeviceEntries"]:
        if entry["PodUID"] == pod_uid and entry["ResourceName"] == names.RESOURCE_GPU_MEMORY:
            for ids in entry["DeviceIDs"].values():
                devices += ids
    return devices


def test_a_kubelet_restart_keeps_the_running_grant_and_registers_the_plugin_again(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    workloads.deploy(real_node, ns, "steady", memory="8Gi")
    [before] = workloads.wait_running(real_node, ns, "steady-predictor", 1)
    uid = before["metadata"]["uid"]
    container = before["status"]["containerStatuses"][0]
    assert len(checkpoint_devices(uid)) == 8

    real_node.kubelet.stop()
    real_node.kubelet.start()

    def registered_again() -> bool:
        request = "Got registration request from device plugin with resource"
        return f'{request}" resourceName="{names.RESOURCE_GPU_MEMORY}"' in real_node.kubelet.log(
            400
        )

    cluster.wait_for(registered_again, timeout=120, interval=1, what="the plugin to register")
    [after] = workloads.wait_running(real_node, ns, "steady-predictor", 1)
    # The same container runs on, never restarted, and kubelet restored its devices.
    assert after["metadata"]["uid"] == uid
    status = after["status"]["containerStatuses"][0]
    assert status["containerID"] == container["containerID"]
    assert status["restartCount"] == 0
    assert len(checkpoint_devices(uid)) == 8

    # A new pod after the restart is admitted with the plugin's devices again.
    workloads.deploy(real_node, ns, "late", memory="4Gi")
    [pod] = workloads.wait_running(real_node, ns, "late-predictor", 1)
    line = workloads.standin_line(cp, ns, pod["metadata"]["name"])
    assert line["result"] == "started", line
    assert (
        line["env"][names.ENV_GRANTED_BYTES]
        == pod["metadata"]["annotations"][names.ANNOTATION_GRANTED_BYTES]
    )

    # The checkpoint, PodResources and the extender's ledger agree on what the card holds.
    held = {(h.namespace, h.name): h.devices for h in workloads.kubelet_holdings()}
    assert sorted(held[ns, after["metadata"]["name"]]) == sorted(checkpoint_devices(uid))
    [granted] = workloads.ledger_granted_bytes(real_node).values()
    assert granted == workloads.holdings_bytes(workloads.kubelet_holdings())
