"""The DRA backend under the real kubelet and container runtime: KServe's controller → Deployment →
pod → gpushare's webhook (its DRA output: a claim from a ResourceClaimTemplate) →
kube-controller-manager's ResourceClaim controller → kube-scheduler's DRA allocator → the real
kubelet's ``NodePrepareResources`` over the agent's socket → containerd applying the claim's CDI
spec → the stand-in vLLM, started with the environment the device plugin gives the same grant.

The node moves to the DRA backend for this module and back afterwards (:func:`local.on_dra`); the
reference is the same service on the extender backend, through the device plugin's ``Allocate``,
first.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import config, names, quantities
from gpushare.deviceplugin import escapes
from gpushare.deviceplugin.dra import cdi
from tests import cluster
from tests.deviceplugin.conftest import CARD_A, card, write_fake
from tests.node import kserve, local, runtime, workloads
from tests.node.local import RealNode
from tests.node.test_kserve import ISVC_API, create, isvc_ready, predictor_pods

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("kserve_manager")]

MEMORY = "20Gi"
PER_GRANT = {names.ENV_MPS_PIPE_DIRECTORY}
"""The one variable that differs between two grants of the same size on the same card: each
grant has its own MPS daemon, so its own pipe folder."""


def _serve(node: RealNode, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The seed's service at :data:`MEMORY` in ``namespace``, Ready: its pod and stand-in line."""
    create(node, kserve.seed(node.nvml_file, "isvc-vllm-openai.yaml", "bloom", namespace, MEMORY))
    isvc_ready(node, namespace, "bloom")
    [pod] = predictor_pods(node, namespace, "bloom")
    line = workloads.standin_line(node.cp, namespace, pod["metadata"]["name"])
    assert line["result"] == "started", line
    return pod, line


def _namespace(node: RealNode, prefix: str, labels: dict[str, str]) -> str:
    name = cluster.unique_name(prefix, max_len=40)
    cluster.create_namespace(node.cp, name, labels=labels)
    return name


def _drain(node: RealNode, namespace: str) -> None:
    node.cp.kubectl("delete", "namespace", namespace, "--timeout=120s", check=False, timeout=150)


@pytest.fixture(scope="module")
def extender_env(real_node: RealNode) -> dict[str, str]:
    """What the device plugin's ``Allocate`` gave the service through the real kubelet, on the
    extender backend (the node's start)."""
    namespace = _namespace(real_node, "dra-ref", {})
    try:
        pod, line = _serve(real_node, namespace)
        assert pod["spec"]["schedulerName"] == names.SCHEDULER_NAME
        env: dict[str, str] = line["env"]
        return env
    finally:
        _drain(real_node, namespace)


@pytest.fixture(scope="module")
def dra_node(real_node: RealNode, extender_env: dict[str, str]) -> Iterator[RealNode]:
    with local.on_dra(real_node):
        yield real_node


@pytest.fixture
def dra_namespace(dra_node: RealNode) -> Iterator[str]:
    """A namespace labelled for the DRA backend; drained afterwards."""
    namespace = _namespace(dra_node, "dra", {names.LABEL_BACKEND: "dra"})
    yield namespace
    _drain(dra_node, namespace)


def _claim(node: RealNode, pod: dict[str, Any]) -> dict[str, Any]:
    [status] = pod["status"]["resourceClaimStatuses"]
    assert status["name"] == names.DRA_CLAIM_NAME
    namespace = pod["metadata"]["namespace"]
    return node.cp.rest().get(
        f"/apis/{names.DRA_API_VERSION}/namespaces/{namespace}/resourceclaims/{status['resourceClaimName']}"
    )


@dataclass(frozen=True)
class OnClaim:
    """The seed's service served on a claim: its pod, stand-in line, claim, CDI spec, MPS pipe."""

    pod: dict[str, Any]
    line: dict[str, Any]
    claim: dict[str, Any]
    spec: Path
    pipe: Path


def _serve_on_claim(node: RealNode, namespace: str) -> OnClaim:
    pod, line = _serve(node, namespace)
    claim = _claim(node, pod)
    spec = cdi.path(runtime.CDI_DIR, claim["metadata"]["uid"])
    return OnClaim(pod, line, claim, spec, Path(line["env"][names.ENV_MPS_PIPE_DIRECTORY]))


def test_the_seed_service_runs_on_a_claim_the_real_kubelet_prepared(
    dra_node: RealNode, dra_namespace: str, extender_env: dict[str, str]
) -> None:
    served = _serve_on_claim(dra_node, dra_namespace)
    pod, line, claim, spec, pipe = (served.pod, served.line, served.claim, served.spec, served.pipe)

    # No extender: the cluster's own kube-scheduler placed it by its claim, not by gpu-memory.
    assert pod["spec"]["schedulerName"] == "default-scheduler"
    assert pod["spec"]["nodeName"] == dra_node.name
    [container] = pod["spec"]["containers"]
    assert names.RESOURCE_GPU_MEMORY not in container["resources"].get("limits", {})
    assert {"name": names.DRA_CLAIM_NAME} in container["resources"]["claims"]

    # kube-scheduler's allocator wrote the card and the memory into the claim's status.
    [result] = claim["status"]["allocation"]["devices"]["results"]
    assert result["driver"] == names.DRA_DRIVER
    assert result["pool"] == dra_node.name
    consumed = result["consumedCapacity"][names.DRA_CAPACITY_MEMORY]
    [reserved] = claim["status"]["reservedFor"]
    assert reserved["uid"] == pod["metadata"]["uid"]

    # The real kubelet prepared it over the agent's socket; containerd applied the CDI spec it
    # named, so the container has the environment the device plugin gives the same grant.
    assert spec.exists(), sorted(p.name for p in runtime.CDI_DIR.glob("*"))
    env = line["env"]
    assert env[names.ENV_CARD_UUID] == CARD_A
    assert {k: v for k, v in env.items() if k not in PER_GRANT} == {
        k: v for k, v in extender_env.items() if k not in PER_GRANT
    }
    assert env.keys() >= PER_GRANT
    assert int(env[names.ENV_GRANTED_BYTES]) == 20 * 1024**3
    # It consumed the grant and the per-grant MPS server, as the extender's ledger counts them.
    overhead = config.validate({}).allocation_overhead_bytes
    assert quantities.parse_bytes(consumed) == 20 * 1024**3 + overhead
    # kubelet never sees a CDI spec's variables: the webhook wrote vLLM's utilization out.
    assert f"{names.VLLM_UTILIZATION_FLAG}={env[names.ENV_VLLM_UTILIZATION]}" in line["argv"]

    assert pipe in workloads.live_daemons()

    # Deleting the service ends the pod: kubelet unprepares the claim (its CDI spec goes, its MPS
    # daemon stops) and the claim, made from the template for this pod, is deleted with it.
    dra_node.cp.rest().delete(f"{ISVC_API.format(ns=dra_namespace)}/bloom")
    claims = f"/apis/{names.DRA_API_VERSION}/namespaces/{dra_namespace}/resourceclaims"
    cluster.wait_for(
        lambda: not spec.exists() and not dra_node.cp.rest().get(claims)["items"],
        timeout=120, interval=1, what="the claim unprepared (its CDI spec removed) and deleted",
    )  # fmt: skip
    assert pipe not in workloads.live_daemons()


def test_a_service_that_finds_no_room_waits_with_the_schedulers_reason_then_takes_the_freed_memory(
    dra_node: RealNode, dra_namespace: str
) -> None:
    def seed(name: str) -> dict[str, Any]:
        return kserve.seed(dra_node.nvml_file, "isvc-vllm-openai.yaml", name, dra_namespace, "50Gi")

    create(dra_node, seed("first"))
    isvc_ready(dra_node, dra_namespace, "first")
    create(dra_node, seed("second"))

    def unschedulable() -> str | None:
        for pod in predictor_pods(dra_node, dra_namespace, "second"):
            for condition in pod["status"].get("conditions") or []:
                if condition["type"] == "PodScheduled" and condition["status"] == "False":
                    return str(condition.get("message"))
        return None

    message = cluster.wait_for(unschedulable, timeout=120, interval=1, what="second unschedulable")
    assert "cannot allocate all claims" in message, message

    # The first one's claim deallocated when its pod ended: the allocator places the second.
    dra_node.cp.rest().delete(f"{ISVC_API.format(ns=dra_namespace)}/first")
    isvc_ready(dra_node, dra_namespace, "second")
    [pod] = predictor_pods(dra_node, dra_namespace, "second")
    line = workloads.standin_line(dra_node.cp, dra_namespace, pod["metadata"]["name"])
    assert line["result"] == "started", line
    assert int(line["env"][names.ENV_GRANTED_BYTES]) == 50 * 1024**3


def test_a_replaced_dra_agent_keeps_the_claims_grant_and_unprepares_it_later(
    dra_node: RealNode, dra_namespace: str
) -> None:
    served = _serve_on_claim(dra_node, dra_namespace)
    spec, pipe = served.spec, served.pipe
    assert pipe in workloads.live_daemons()

    # A DaemonSet rollout or an eviction: the new agent adopts the claim from its CDI spec, and
    # kubelet's plugin watcher registers it again; the container runs on.
    local.replace_agent(dra_node, timeout=180)
    [after] = predictor_pods(dra_node, dra_namespace, "bloom")
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert spec.exists()
    # Its MPS daemon runs in the same pipe folder (started again where it ended with the old pod's
    # cgroup, on cgroup v1).
    cluster.wait_for(
        lambda: pipe in workloads.live_daemons(), timeout=60, interval=1,
        what="the claim's daemon to run",
    )  # fmt: skip

    # The new agent unprepares what the old one prepared: spec and daemon go with the pod.
    dra_node.cp.rest().delete(f"{ISVC_API.format(ns=dra_namespace)}/bloom")
    cluster.wait_for(
        lambda: not spec.exists() and pipe not in workloads.live_daemons(), timeout=120,
        interval=1,
        what="the claim unprepared by the new agent: CDI spec removed, daemon stopped",
    )  # fmt: skip


def test_a_dra_container_that_leaves_mps_is_caught_through_its_claim_and_evicted(
    dra_node: RealNode, dra_namespace: str
) -> None:
    pod, _ = _serve(dra_node, dra_namespace)
    name = pod["metadata"]["name"]
    [status] = pod["status"]["containerStatuses"]
    container_id = status["containerID"].split("://")[1]
    tasks = dra_node.containerd.ctr("tasks", "list").stdout.splitlines()[1:]
    [pid] = [int(fields[1]) for fields in (t.split() for t in tasks) if fields[0] == container_id]

    # NVML lists the container's process with a context outside MPS: the agent finds its grant
    # through the pod's claim (kube-controller-manager's resourceClaimStatuses, the claim prepared
    # here) and the cgroup runc gave the process, and acts as on the device plugin's grants.
    escaped = [{"pid": pid, "card": CARD_A, "used": "2Gi", "kind": "cuda"}]
    write_fake(dra_node.nvml_file, [card(CARD_A, 0)], processes=escaped)
    try:

        def caught() -> dict[str, Any] | None:
            found = dra_node.cp.rest().get(f"/api/v1/namespaces/{dra_namespace}/events")["items"]
            for event in found:
                if event["reason"] == escapes.REASON and event["involvedObject"]["name"] == name:
                    return dict(event)
            return None

        event = cluster.wait_for(caught, timeout=60, interval=1, what="the escape's Event")
        assert status["name"] in event["message"], event["message"]
        cluster.wait_for(
            lambda: all(p["metadata"]["name"] != name for p in predictor_pods(
                dra_node, dra_namespace, "bloom"
            )),
            timeout=60, interval=1, what=f"{name} evicted",
        )  # fmt: skip
    finally:
        write_fake(dra_node.nvml_file, [card(CARD_A, 0)])


def test_a_kubelet_restart_keeps_the_prepared_claim_and_unprepares_it_from_its_checkpoint(
    dra_node: RealNode, dra_namespace: str
) -> None:
    served = _serve_on_claim(dra_node, dra_namespace)
    spec, pipe = served.spec, served.pipe
    [before] = served.pod["status"]["containerStatuses"]

    dra_node.kubelet.stop()
    dra_node.kubelet.start()

    # The plugin watcher registers the agent again: a service created now is prepared and runs.
    create(
        dra_node,
        kserve.seed(dra_node.nvml_file, "isvc-vllm-openai.yaml", "late", dra_namespace, "8Gi"),
    )
    isvc_ready(dra_node, dra_namespace, "late")
    [late] = predictor_pods(dra_node, dra_namespace, "late")
    late_line = workloads.standin_line(dra_node.cp, dra_namespace, late["metadata"]["name"])
    assert int(late_line["env"][names.ENV_GRANTED_BYTES]) == 8 * 1024**3

    # The first container runs on, never restarted, its claim still prepared.
    [after] = predictor_pods(dra_node, dra_namespace, "bloom")
    [status] = after["status"]["containerStatuses"]
    assert (status["containerID"], status["restartCount"]) == (before["containerID"], 0)
    assert spec.exists()
    assert pipe in workloads.live_daemons()

    # The restarted kubelet unprepares it from its own checkpoint when the pod goes.
    dra_node.cp.rest().delete(f"{ISVC_API.format(ns=dra_namespace)}/bloom")
    cluster.wait_for(
        lambda: not spec.exists() and pipe not in workloads.live_daemons(), timeout=120,
        interval=1, what="the claim unprepared after kubelet's restart",
    )  # fmt: skip
