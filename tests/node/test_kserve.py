"""The seed's InferenceServices through KServe's own controller (tests/node/kserve.py) on the real
node: KServe → Deployment → ReplicaSet → pod → gpushare's webhook → kube-scheduler + extender →
kubelet → gpushare's device plugin → the stand-in vLLM, and the InferenceService Ready.

The seed's services as this machine runs them: :func:`kserve.seed`."""

import copy
from typing import Any

import pytest

from gpushare.core import names
from gpushare.simulator import kserve as builder
from tests import cluster
from tests.node import kserve, workloads
from tests.node.local import RealNode
from tests.webhook import builders

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("kserve_manager")]

ISVC_API = "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices"


def isvc_ready(node: RealNode, namespace: str, name: str) -> dict[str, Any]:
    """Wait for the InferenceService's Ready condition; on timeout show what KServe said."""
    path = f"{ISVC_API.format(ns=namespace)}/{name}"

    def ready() -> dict[str, Any] | None:
        body = node.cp.rest().get(path)
        conditions = body.get("status", {}).get("conditions") or []
        done = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return body if done else None

    try:
        return cluster.wait_for(ready, timeout=240, interval=1, what=f"{name} Ready")
    except TimeoutError as exc:
        body = node.cp.rest().get(path)
        state = node.cp.kubectl("get", "all,events", "-n", namespace, "-o", "wide").stdout
        raise AssertionError(f"{exc}\n{body.get('status')}\n{state}") from exc


def predictor_pods(node: RealNode, namespace: str, name: str) -> list[dict[str, Any]]:
    found = node.cp.rest().get(
        f"/api/v1/namespaces/{namespace}/pods",
        labelSelector=f"{builder.ISVC_LABEL}={name},component=predictor",
    )["items"]
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def create(node: RealNode, body: dict[str, Any]) -> None:
    namespace = body["metadata"]["namespace"]
    node.cp.rest().create(ISVC_API.format(ns=namespace), body)


def check_served(node: RealNode, pod: dict[str, Any], units: int) -> dict[str, Any]:
    """The pod went through gpushare, and its stand-in vLLM started within its grant."""
    assert pod["spec"]["schedulerName"] == names.SCHEDULER_NAME
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == builder.CONTAINER]
    assert container["resources"]["limits"] == {
        **{k: v for k, v in kserve.SMALL["limits"].items() if k != names.NVIDIA_GPU_RESOURCE},
        names.RESOURCE_GPU_MEMORY: str(units),
    }
    line = workloads.standin_line(node.cp, pod["metadata"]["namespace"], pod["metadata"]["name"])
    assert line["result"] == "started", line
    granted = pod["metadata"]["annotations"][names.ANNOTATION_GRANTED_BYTES]
    assert line["env"][names.ENV_GRANTED_BYTES] == granted
    assert int(granted) == units * 1024**3
    utilization = line["env"][names.ENV_VLLM_UTILIZATION]
    assert f"--gpu-memory-utilization={utilization}" in line["argv"]
    return line


def test_the_seed_service_goes_ready_through_kserves_controller(
    real_node: RealNode, node_namespace: str
) -> None:
    body = kserve.seed(
        real_node.nvml_file, "isvc-vllm-openai.yaml", "bloom", node_namespace, "20Gi"
    )
    create(real_node, body)
    isvc_ready(real_node, node_namespace, "bloom")
    [pod] = predictor_pods(real_node, node_namespace, "bloom")
    assert pod["spec"]["nodeName"] == real_node.name
    check_served(real_node, pod, 20)


def test_our_kserve_pod_builder_matches_what_kserves_controller_makes(
    real_node: RealNode, node_namespace: str
) -> None:
    body = kserve.seed(real_node.nvml_file, "isvc-vllm-openai.yaml", "twin", node_namespace, "8Gi")
    create(real_node, body)
    deployment = cluster.wait_for(
        lambda: real_node.cp.rest().get(
            f"/apis/apps/v1/namespaces/{node_namespace}/deployments"
        )["items"] or None,
        timeout=60, interval=1, what="KServe's Deployment",
    )[0]  # fmt: skip
    real = deployment["spec"]["template"]
    ours = builder.component_pod(body, "predictor")
    # What the webhook and the extender read: the container the user wrote, its name, image,
    # command, arguments, resources and environment; the service's label and annotation.
    [real_container] = [c for c in real["spec"]["containers"] if c["name"] == builder.CONTAINER]
    [our_container] = ours["spec"]["containers"]
    for key in ("image", "command", "args", "resources"):
        assert real_container.get(key) == our_container.get(key), key
    ours_env = {e["name"]: e.get("value") for e in our_container.get("env") or []}
    real_env = {e["name"]: e.get("value") for e in real_container.get("env") or []}
    assert ours_env.items() <= real_env.items()
    assert real["metadata"]["labels"][builder.ISVC_LABEL] == "twin"
    annotations = real["metadata"].get("annotations") or {}
    assert annotations.get(names.ANNOTATION_GPU_MEMORY) == "8Gi"
    assert [c["name"] for c in real["spec"].get("initContainers") or []] == [
        c["name"] for c in ours["spec"].get("initContainers") or []
    ]


def test_the_transformer_is_left_alone_and_the_predictor_gets_its_slice(
    real_node: RealNode, node_namespace: str
) -> None:
    body = builders.with_transformer(
        kserve.seed(real_node.nvml_file, "isvc-vllm-openai.yaml", "fronted", node_namespace, "10Gi")
    )
    [transformer] = body["spec"]["transformer"]["containers"]
    transformer.update(
        image=real_node.images["gpushare"],
        command=["python3", "-c", "import signal; signal.pause()"],
        args=[],
        resources={"requests": {"cpu": "10m", "memory": "32Mi"},
                   "limits": {"cpu": "100m", "memory": "128Mi"}},
    )  # fmt: skip
    create(real_node, body)
    isvc_ready(real_node, node_namespace, "fronted")
    [pod] = predictor_pods(real_node, node_namespace, "fronted")
    check_served(real_node, pod, 10)
    [front] = [
        p
        for p in real_node.cp.rest().get(
            f"/api/v1/namespaces/{node_namespace}/pods",
            labelSelector=f"{builder.ISVC_LABEL}=fronted,component=transformer",
        )["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    # KServe copied the service's annotation onto the transformer; no GPU asked, nothing changed.
    assert front["metadata"]["annotations"][names.ANNOTATION_GPU_MEMORY] == "10Gi"
    assert front["spec"]["schedulerName"] == "default-scheduler"
    assert names.ANNOTATION_MUTATED not in front["metadata"]["annotations"]
    for container in front["spec"]["containers"]:
        assert names.RESOURCE_GPU_MEMORY not in (container.get("resources") or {}).get("limits", {})
    # Our KServe pod builder makes the same transformer: the arguments KServe adds to reach the
    # predictor, the container's name and image.
    [ours] = builder.component_pod(body, "transformer")["spec"]["containers"]
    [real] = [c for c in front["spec"]["containers"] if c["name"] == builder.CONTAINER]
    assert (real["image"], real.get("args")) == (ours["image"], ours.get("args"))


def test_four_services_created_at_once_share_the_card(
    real_node: RealNode, node_namespace: str
) -> None:
    fixtures = ["isvc-vllm-openai.yaml", "isvc-vllm-api-server.yaml"] * 2
    bodies = [
        kserve.seed(real_node.nvml_file, fixture, f"quad-{i}", node_namespace, f"{10 + 4 * i}Gi")
        for i, fixture in enumerate(fixtures)
    ]
    for body in bodies:
        create(real_node, body)
    held: dict[str, tuple[str, ...]] = {}
    for i, body in enumerate(bodies):
        name = body["metadata"]["name"]
        isvc_ready(real_node, node_namespace, name)
        [pod] = predictor_pods(real_node, node_namespace, name)
        check_served(real_node, pod, 10 + 4 * i)
        held[pod["metadata"]["name"]] = next(
            h.devices for h in workloads.kubelet_holdings() if h.name == pod["metadata"]["name"]
        )
    ids = [device for devices in held.values() for device in devices]
    assert len(ids) == len(set(ids)) == 10 + 14 + 18 + 22
    [granted] = workloads.ledger_granted_bytes(real_node).values()
    assert granted == workloads.holdings_bytes(workloads.kubelet_holdings())


def test_scale_to_zero_and_back_then_delete_returns_the_memory(
    real_node: RealNode, node_namespace: str
) -> None:
    body = kserve.seed(real_node.nvml_file, "isvc-vllm-openai.yaml", "tide", node_namespace, "30Gi")
    # No HorizontalPodAutoscaler (it cannot go below one replica): KServe then sets the
    # Deployment's replicas to minReplicas itself.
    body["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] = "none"
    body["spec"]["predictor"]["minReplicas"] = 1
    create(real_node, body)
    isvc_ready(real_node, node_namespace, "tide")
    path = f"{ISVC_API.format(ns=node_namespace)}/tide"

    def card_bytes() -> int:
        return sum(workloads.ledger_granted_bytes(real_node).values())

    assert card_bytes() >= 30 * 1024**3
    real_node.cp.rest().patch(path, {"spec": {"predictor": {"minReplicas": 0}}})
    cluster.wait_for(
        lambda: not predictor_pods(real_node, node_namespace, "tide") and card_bytes() == 0,
        timeout=120, interval=1, what="the predictor scaled to zero and its grant freed",
    )  # fmt: skip
    real_node.cp.rest().patch(path, {"spec": {"predictor": {"minReplicas": 1}}})
    cluster.wait_for(
        lambda: len(predictor_pods(real_node, node_namespace, "tide")) == 1,
        timeout=120, interval=1, what="the predictor back",
    )  # fmt: skip
    isvc_ready(real_node, node_namespace, "tide")
    [pod] = predictor_pods(real_node, node_namespace, "tide")
    check_served(real_node, pod, 30)

    real_node.cp.rest().delete(path)
    cluster.wait_for(
        lambda: not predictor_pods(real_node, node_namespace, "tide") and card_bytes() == 0,
        timeout=120, interval=1, what="the deleted service's grant freed",
    )  # fmt: skip


def test_a_new_model_argument_on_a_full_card_rolls_out_with_max_surge_zero(
    real_node: RealNode, node_namespace: str
) -> None:
    body = kserve.seed(real_node.nvml_file, "isvc-vllm-openai.yaml", "swap", node_namespace, "48Gi")
    create(real_node, body)
    isvc_ready(real_node, node_namespace, "swap")
    [old] = predictor_pods(real_node, node_namespace, "swap")
    path = f"{ISVC_API.format(ns=node_namespace)}/swap"
    container = copy.deepcopy(body["spec"]["predictor"]["containers"][0])
    container["args"] = [*container["args"][:-1], "/mnt/models/v2"]
    real_node.cp.rest().patch(path, {"spec": {"predictor": {"containers": [container]}}})

    def surge_waits() -> bool:
        pods = predictor_pods(real_node, node_namespace, "swap")
        new = [p for p in pods if p["metadata"]["uid"] != old["metadata"]["uid"]]
        conditions = [c for p in new for c in p["status"].get("conditions") or []]
        return any(c.get("reason") == "Unschedulable" for c in conditions)

    # KServe's default (maxSurge 1, maxUnavailable 0): the new pod needs a second 48 GiB.
    cluster.wait_for(surge_waits, timeout=120, interval=1, what="the surge pod to wait for room")
    assert workloads.running(real_node.cp.rest().get(
        f"/api/v1/namespaces/{node_namespace}/pods/{old['metadata']['name']}"
    ))  # fmt: skip

    # docs/install.md: maxSurge 0 lets the old pod go first; the new one takes its grant.
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    real_node.cp.rest().patch(path, {"spec": {"predictor": {"deploymentStrategy": strategy}}})

    def replaced() -> dict[str, Any] | None:
        pods = predictor_pods(real_node, node_namespace, "swap")
        fresh = [p for p in pods if "/mnt/models/v2" in p["spec"]["containers"][0]["args"]]
        return fresh[0] if len(pods) == 1 and fresh and workloads.running(fresh[0]) else None

    new = cluster.wait_for(replaced, timeout=240, interval=1, what="the rollout to finish")
    line = check_served(real_node, new, 48)
    assert "/mnt/models/v2" in line["argv"]
    isvc_ready(real_node, node_namespace, "swap")
