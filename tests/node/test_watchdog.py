"""The watchdog's cgroup locator on the real kubelet's containers: cgroup v1 paths made by kubelet
(cgroupfs driver) and runc map each container's process to its pod and container."""

import pytest

from gpushare.deviceplugin.watchdog import CgroupLocator
from tests.node import workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)


def test_the_cgroup_locator_maps_container_processes_to_their_pods(
    real_node: RealNode, node_namespace: str
) -> None:
    ns = node_namespace
    workloads.deploy(real_node, ns, "located", memory="4Gi", replicas=2)
    pods = workloads.wait_running(real_node, ns, "located-predictor", 2)

    tasks = real_node.containerd.ctr("tasks", "list").stdout.splitlines()[1:]
    pid_of = {fields[0]: int(fields[1]) for fields in (line.split() for line in tasks)}
    locator = CgroupLocator()
    for pod in pods:
        container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
        location = locator.locate(pid_of[container_id])
        assert location is not None, f"no pod in the cgroups of {pod['metadata']['name']}"
        assert location.pod_uid == pod["metadata"]["uid"]
        assert location.container_id == container_id
