"""Scaling a predictor from 1 to 3 replicas and back frees the grants of the pods removed."""

import pytest

from tests import cluster
from tests.node import workloads
from tests.node.local import RealNode

pytestmark = pytest.mark.timeout(600)


def scale(real_node: RealNode, namespace: str, deployment: str, replicas: int) -> None:
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"
    real_node.cp.rest().patch(path, {"spec": {"replicas": replicas}})


def test_scaling_down_frees_the_card_for_the_next_service(
    real_node: RealNode, node_namespace: str
) -> None:
    cp, ns = real_node.cp, node_namespace
    workloads.deploy(real_node, ns, "scaled", memory="24Gi")
    workloads.wait_running(real_node, ns, "scaled-predictor", 1)

    scale(real_node, ns, "scaled-predictor", 3)  # 72 of the card's 79 GiB
    workloads.wait_running(real_node, ns, "scaled-predictor", 3)
    scale(real_node, ns, "scaled-predictor", 1)

    def gone() -> bool:
        pods = cp.rest().get(f"/api/v1/namespaces/{ns}/pods", labelSelector="app=scaled-predictor")
        return len(pods["items"]) == 1

    cluster.wait_for(gone, timeout=120, interval=1, what="the two extra pods to be deleted")

    # 48 GiB fit beside the 24 left only if the 48 of the two removed pods were freed.
    workloads.deploy(real_node, ns, "wide", memory="48Gi")
    [pod] = workloads.wait_running(real_node, ns, "wide-predictor", 1)
    line = workloads.standin_line(cp, ns, pod["metadata"]["name"])
    assert line["result"] == "started", line
