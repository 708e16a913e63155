"""The real control plane works: apiserver, node reports, pods, kube-scheduler, tokens and RBAC."""

import json
from typing import Any

import pytest
from kubernetes import client as k8s

from gpushare.core import names, nodereport
from tests import cluster

pytestmark = pytest.mark.cluster

SCHEDULER_CONFIG = f"""\
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: {cluster.KUBECONFIG_PLACEHOLDER}
profiles:
  - schedulerName: gpushare-smoke
"""


def _pod(name: str, *, scheduler: str | None = None, **requests: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {"requests": requests, "limits": requests} if requests else {},
            }
        ]
    }
    if scheduler:
        spec["schedulerName"] = scheduler
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_versions_are_the_pinned_release(control_plane: cluster.ControlPlane) -> None:
    k8s_version, _ = cluster.pinned_versions()
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == k8s_version
    assert out["serverVersion"]["gitVersion"] == k8s_version


def test_node_report_round_trips(control_plane: cluster.ControlPlane, namespace: str) -> None:
    cards = [cluster.gpu_card(0, total="80Gi", used="2Gi"), cluster.gpu_card(1, total="40Gi")]
    report = cluster.node_report(cards)
    node_name = f"{namespace}-gpu"
    cluster.register_gpu_node(control_plane, node_name, cards, report=report, owner=namespace)

    node = control_plane.rest().get(f"/api/v1/nodes/{node_name}")
    assert (
        nodereport.decode(node["metadata"]["annotations"][names.ANNOTATION_NODE_REPORT]) == report
    )
    units = str(80 + 40)
    assert node["status"]["allocatable"][names.RESOURCE_GPU_MEMORY] == units
    assert node["status"]["capacity"][names.RESOURCE_GPU_MEMORY] == units
    assert "taints" not in node["spec"]
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    assert node["metadata"]["labels"][names.LABEL_ENABLED] == "true"

    # The official (pydantic-typed) client reads the same.
    with control_plane.api_client() as api:
        typed = k8s.CoreV1Api(api).read_node(node_name)
    assert typed.metadata is not None
    assert typed.metadata.annotations is not None
    assert nodereport.decode(typed.metadata.annotations[names.ANNOTATION_NODE_REPORT]) == report

    newer = cluster.node_report([cards[0]])
    cluster.set_node_report(control_plane, node_name, newer)
    node = control_plane.rest().get(f"/api/v1/nodes/{node_name}")
    assert nodereport.decode(node["metadata"]["annotations"][names.ANNOTATION_NODE_REPORT]) == newer


def test_pod_round_trips(control_plane: cluster.ControlPlane, namespace: str) -> None:
    rest = control_plane.rest()
    rest.create(f"/api/v1/namespaces/{namespace}/pods", _pod("plain", cpu="100m"))
    pod = rest.get(f"/api/v1/namespaces/{namespace}/pods/plain")
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "100m"}
    # The ServiceAccount admission plugin ran (and found the `default` ServiceAccount).
    assert pod["spec"]["serviceAccountName"] == "default"
    assert pod["status"]["phase"] == "Pending"
    with pytest.raises(cluster.ApiError) as exists:
        rest.create(f"/api/v1/namespaces/{namespace}/pods", _pod("plain", cpu="100m"))
    assert exists.value.status == 409
    assert exists.value.reason == "AlreadyExists"


def test_server_side_dry_run_rejects_a_bad_object(
    control_plane: cluster.ControlPlane, namespace: str
) -> None:
    bad = _pod("bad", cpu="100m")
    bad["spec"]["containers"][0]["resources"]["limits"] = {"cpu": "50m"}
    result = control_plane.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False
    )
    assert result.returncode != 0
    assert "must be less than or equal to cpu limit" in result.stderr
    with pytest.raises(cluster.ApiError) as invalid:
        control_plane.rest().create(f"/api/v1/namespaces/{namespace}/pods", bad, dryRun="All")
    assert invalid.value.reason == "Invalid"


def test_kube_scheduler_binds_pods_to_fake_nodes(
    control_plane: cluster.ControlPlane, namespace: str
) -> None:
    node_name = f"{namespace}-gpu"
    cluster.register_gpu_node(
        control_plane, node_name, [cluster.gpu_card(0, total="80Gi")], owner=namespace
    )
    selector = {cluster.LABEL_OWNER: namespace}
    fits = _pod("fits", scheduler="gpushare-smoke", cpu="1", **{names.RESOURCE_GPU_MEMORY: "20"})
    too_big = _pod("too-big", scheduler="gpushare-smoke", **{names.RESOURCE_GPU_MEMORY: "81"})
    for pod in (fits, too_big):
        pod["spec"]["nodeSelector"] = selector
    rest = control_plane.rest()
    pods = f"/api/v1/namespaces/{namespace}/pods"

    with control_plane.start_scheduler(SCHEDULER_CONFIG):
        rest.create(pods, fits)
        rest.create(pods, too_big)

        def bound() -> str | None:
            node: str | None = rest.get(f"{pods}/fits")["spec"].get("nodeName")
            return node

        assert cluster.wait_for(bound, timeout=30, what="pod bound") == node_name

        def unschedulable() -> str | None:
            status = rest.get(f"{pods}/too-big")["status"]
            for condition in status.get("conditions", []):
                if condition["type"] == "PodScheduled" and condition["status"] == "False":
                    message: str = condition.get("message", "")
                    return message
            return None

        message = cluster.wait_for(unschedulable, timeout=30, what="too-big marked unschedulable")
        assert f"Insufficient {names.RESOURCE_GPU_MEMORY}" in message
        assert "nodeName" not in rest.get(f"{pods}/too-big")["spec"]


def test_service_account_tokens_and_rbac(
    control_plane: cluster.ControlPlane, namespace: str
) -> None:
    control_plane.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "reader")
    whoami = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{namespace}:reader"

    reader = control_plane.rest(token=control_plane.create_token(namespace, "reader"))
    with pytest.raises(cluster.ApiError) as denied:
        reader.get(f"/api/v1/namespaces/{namespace}/pods")
    assert denied.value.status == 403

    control_plane.kubectl(
        "create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace
    )
    control_plane.kubectl(
        "create", "rolebinding", "reader", "--role=pod-reader",
        f"--serviceaccount={namespace}:reader", "-n", namespace,
    )  # fmt: skip

    def allowed() -> list[Any] | None:
        try:
            items: list[Any] = reader.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
        except cluster.ApiError:
            return None  # the RBAC informers have not seen the binding yet
        return items

    assert cluster.wait_for(allowed, timeout=10, what="RBAC to allow listing pods") == []
    with pytest.raises(cluster.ApiError) as still_denied:
        reader.get("/api/v1/nodes")
    assert still_denied.value.status == 403
