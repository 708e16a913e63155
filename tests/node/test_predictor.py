"""A KServe-shaped predictor on the real kubelet: Deployment → ReplicaSet → pod → webhook →
kube-scheduler + extender → kubelet → the device plugin → a running container with its grant."""

from decimal import Decimal

import pytest

from gpushare.core import names
from tests.deviceplugin.conftest import CARD_A
from tests.node import workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)


def test_a_predictor_deployment_runs_with_the_grant_kubelet_expanded(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    workloads.deploy(real_node, ns, "bloom")
    [pod] = workloads.wait_running(real_node, ns, "bloom-predictor", 1)

    # Deployment → ReplicaSet → pod, each made by kube-controller-manager.
    [owner] = pod["metadata"]["ownerReferences"]
    assert owner["kind"] == "ReplicaSet"
    replica_set = cp.rest().get(f"/apis/apps/v1/namespaces/{ns}/replicasets/{owner['name']}")
    assert replica_set["metadata"]["ownerReferences"][0]["name"] == "bloom-predictor"

    # The webhook mutated it, kube-scheduler and the extender placed it on the real node's card.
    assert pod["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert pod["spec"]["nodeName"] == real_node.name
    annotations = pod["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CARD_UUID] == CARD_A
    granted = int(annotations[names.ANNOTATION_GRANTED_BYTES])

    # The container's environment came from the device plugin's Allocate through the real kubelet,
    # which also expanded $(GPUSHARE_VLLM_GPU_MEMORY_UTILIZATION) in the args; the stand-in started.
    line = workloads.standin_line(cp, ns, pod["metadata"]["name"])
    assert line["result"] == "started", line
    env = line["env"]
    assert env[names.ENV_CARD_UUID] == CARD_A
    assert int(env[names.ENV_GRANTED_BYTES]) == granted
    utilization = env[names.ENV_VLLM_UTILIZATION]
    assert f"{names.VLLM_UTILIZATION_FLAG}={utilization}" in line["argv"]
    assert not any("$(" in word for word in line["argv"]), line["argv"]
    assert Decimal(line["utilization"]) == Decimal(utilization)
    assert env[names.ENV_MPS_MEM_LIMIT].startswith(f"{CARD_A}=")


def test_four_predictors_started_together_share_the_card_each_with_its_own_grant(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    workloads.deploy(real_node, ns, "four", memory="16Gi", replicas=4)
    started = workloads.wait_running(real_node, ns, "four-predictor", 4)

    grants = []
    for pod in started:
        annotations = pod["metadata"]["annotations"]
        line = workloads.standin_line(cp, ns, pod["metadata"]["name"])
        assert line["result"] == "started", line
        # What kubelet handed the container is what the extender wrote on the pod.
        assert line["env"][names.ENV_CARD_UUID] == annotations[names.ANNOTATION_CARD_UUID]
        assert line["env"][names.ENV_GRANTED_BYTES] == annotations[names.ANNOTATION_GRANTED_BYTES]
        grants.append((line["env"][names.ENV_CARD_UUID], line["env"][names.ENV_MPS_PIPE_DIRECTORY]))
    assert {card for card, _ in grants} == {CARD_A}
    assert len({pipe for _, pipe in grants}) == 4, "each container has its own MPS daemon"
