"""Against the real API server: node reports, annotation corrections, Events, evictions, and the
pods the preference reads, written by the real agent through kubernetes_asyncio and read back."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import allocations, names, nodereport
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, pod_key
from gpushare.deviceplugin import escapes, kube, reconcile, watchdog
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.watchdog import CgroupLocator
from tests import cluster
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    H100_CUDA_TOTAL,
    H100_RESERVED,
    H100_TOTAL,
    MI,
    AgentFactory,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import NewPod, TestKubelet
from tests.deviceplugin.test_watchdog import CID, write_proc


@pytest.fixture
async def api(control_plane: cluster.ControlPlane) -> AsyncIterator[kube.KubeApi]:
    client = await kube.KubeApi.connect(control_plane.kubeconfig)
    yield client
    await client.close()


@pytest.fixture
def node(control_plane: cluster.ControlPlane, namespace: str) -> str:
    name = cluster.unique_name("gpu-node", max_len=30)
    cluster.register_gpu_node(control_plane, name, [cluster.gpu_card(0)], owner=namespace)
    return name


WatchPods = Callable[[], Awaitable[kube.PodCache]]
"""Starts a pod cache (see :func:`watch_pods`)."""


@pytest.fixture
async def watch_pods(api: kube.KubeApi, node: str) -> AsyncIterator[WatchPods]:
    """Starts this node's pod cache as the agent runs it (list, then watch); once it has listed."""
    watches: list[asyncio.Task[None]] = []

    async def start() -> kube.PodCache:
        cache = kube.PodCache(api, node)
        watches.append(asyncio.get_running_loop().create_task(cache.run()))
        await asyncio.wait_for(cache.synced.wait(), 10)
        return cache

    yield start
    for watch in watches:
        watch.cancel()


NodeAgent = Callable[..., Awaitable[Agent]]
"""Makes an agent with the given settings (see :func:`node_agent`)."""


@pytest.fixture
def node_agent(
    make_agent: AgentFactory,
    watch_pods: WatchPods,
    api: kube.KubeApi,
    node: str,
    short_tmp: Path,
) -> NodeAgent:
    """An agent of the test's node on the API, with its pods watched and processes located under
    ``short_tmp/proc``."""

    async def make(**settings: Any) -> Agent:
        pods = await watch_pods()
        locator = CgroupLocator(short_tmp / "proc")
        return make_agent(api=api, pods=pods, node=node, locator=locator, **settings)

    return make


def container_labels(node: str, namespace: str, pod: str, **extra: str) -> dict[str, str]:
    """The agent's metric labels of the pod's vLLM container."""
    return {
        "node": node,
        "namespace": namespace,
        "pod": pod,
        "container": "kserve-container",
        **extra,
    }


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait up to 10 s, without blocking the loop, for ``check`` to hold."""
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_report(cp: cluster.ControlPlane, node: str) -> nodereport.NodeReport:
    annotations = cp.rest().get(f"/api/v1/nodes/{node}")["metadata"]["annotations"]
    return nodereport.decode(annotations[names.ANNOTATION_NODE_REPORT])


def create_pod(
    cp: cluster.ControlPlane, namespace: str, name: str, node: str, units: int, **annotations: str
) -> dict[str, Any]:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "vllm/vllm-openai:latest",
                    "resources": {"limits": {names.RESOURCE_GPU_MEMORY: str(units)}},
                }
            ],
        },
    }
    return cp.rest().create(f"/api/v1/namespaces/{namespace}/pods", body)


RunningPod = Callable[[str, dict[str, Any]], str]
"""Starts a pod (see :func:`running_pod`)."""


@pytest.fixture
def running_pod(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    kubelet: TestKubelet,
    short_tmp: Path,
    nvml_file: Path,
) -> RunningPod:
    """Makes a running pod of 4 units on card A of the test's node, whose container runs
    ``process`` (its pid, use and kind as the fake NVML lists them) on that card; its UID."""

    def start(name: str, process: dict[str, Any]) -> str:
        on_a = {names.ANNOTATION_CARD_UUID: CARD_A}
        uid: str = create_pod(control_plane, namespace, name, node, 4, **on_a)["metadata"]["uid"]
        control_plane.rest().patch(
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {
                "status": {
                    "phase": "Running",
                    "containerStatuses": [
                        {
                            "name": "kserve-container",
                            "containerID": f"containerd://{CID}",
                            "image": "vllm",
                            "imageID": "",
                            "ready": True,
                            "restartCount": 0,
                            "state": {"running": {}},
                        },
                    ],
                }
            },
            "strategic",
        )
        kubelet.hold(
            pod_key(namespace, name), "kserve-container", [f"{CARD_A}-{u}" for u in range(4)]
        )
        write_proc(short_tmp / "proc", process["pid"], uid, CID)
        listed = {**process, "card": CARD_A}
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], processes=[listed])
        return uid

    return start


async def poll(agent: Agent) -> None:
    """One poll, and its report written (the poll hands it to a task of its own)."""
    await agent.poll()
    await agent.published()


def events(cp: cluster.ControlPlane, namespace: str, reason: str) -> list[dict[str, Any]]:
    items = cp.rest().get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["reason"] == reason]


async def test_the_node_report_is_written_on_change_and_heartbeat(
    control_plane: cluster.ControlPlane,
    api: kube.KubeApi,
    node: str,
    make_agent: AgentFactory,
    nvml_file: Path,
) -> None:
    now = [0.0]
    agent = make_agent(isolation="none", api=api, node=node, clock=lambda: now[0])
    await poll(agent)
    report = read_report(control_plane, node)
    assert [
        (c.uuid, c.index, c.total_bytes, c.reserved_bytes, c.healthy) for c in report.cards
    ] == [
        (CARD_A, 0, H100_TOTAL, H100_RESERVED, True),
        (CARD_B, 1, H100_TOTAL, H100_RESERVED, True),
    ]
    assert report.cards[0].cuda_total_bytes == H100_TOTAL - H100_RESERVED
    first = report.heartbeat

    # Under report_change_bytes (256 MiB): nothing is written.
    write_fake(nvml_file, [card(CARD_A, 0, used=100 * MI), card(CARD_B, 1)])
    await poll(agent)
    assert read_report(control_plane, node).heartbeat == first

    # A real change goes out at once.
    write_fake(nvml_file, [card(CARD_A, 0, used=3 * GI), card(CARD_B, 1)])
    await poll(agent)
    changed = read_report(control_plane, node)
    assert changed.cards[0].used_bytes == 3 * GI and changed.heartbeat > first

    # So does a health change.
    write_fake(nvml_file, [card(CARD_A, 0, used=3 * GI), card(CARD_B, 1, error="GPU is lost")])
    await poll(agent)
    broken = read_report(control_plane, node)
    assert not broken.cards[1].healthy and broken.cards[1].free_bytes == 0

    # And nothing changing still sends a heartbeat.
    await poll(agent)
    assert read_report(control_plane, node).heartbeat == broken.heartbeat
    now[0] += agent.settings.agent.heartbeat_seconds
    await poll(agent)
    assert read_report(control_plane, node).heartbeat > broken.heartbeat
    assert (
        agent.metrics.registry.get_sample_value("gpushare_node_reports_total", {"node": node}) == 4
    )


async def test_annotations_that_disagree_with_kubelet_are_corrected(
    control_plane: cluster.ControlPlane,
    api: kube.KubeApi,
    namespace: str,
    node: str,
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    watch_pods: WatchPods,
) -> None:
    create_pod(
        control_plane,
        namespace,
        "bloom",
        node,
        6,
        **{
            names.ANNOTATION_CARD_UUID: CARD_A,
            names.ANNOTATION_CARD_INDEX: "0",
            names.ANNOTATION_GRANTED_BYTES: str(6 * GI),
        },
    )
    pods = await watch_pods()
    kubelet.hold(
        pod_key(namespace, "bloom"), "kserve-container", [f"{CARD_B}-{u}" for u in range(6)]
    )
    agent = make_agent(isolation="none", api=api, pods=pods, node=node)
    await agent.poll()
    await agent.published()
    await agent.reconcile()
    pod = control_plane.rest().get(f"/api/v1/namespaces/{namespace}/pods/bloom")
    annotations = pod["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CARD_UUID] == CARD_B
    assert annotations[names.ANNOTATION_CARD_INDEX] == "1"
    assert annotations[names.ANNOTATION_CARD_TOTAL] == str(H100_CUDA_TOTAL)
    assert annotations[names.ANNOTATION_GRANTED_BYTES] == str(6 * GI)
    (event,) = events(control_plane, namespace, reconcile.REASON)
    assert event["involvedObject"]["name"] == "bloom" and event["type"] == "Normal"
    assert CARD_B in event["message"]
    # Once right, nothing more is written.
    await eventually(
        lambda: pods.pods()[0].annotations.get(names.ANNOTATION_CARD_UUID) == CARD_B,
        "the cache to see the correction",
    )
    await agent.reconcile()
    assert len(events(control_plane, namespace, reconcile.REASON)) == 1


async def test_the_preference_follows_kubelets_order_of_pods_read_from_the_api(
    control_plane: cluster.ControlPlane,
    api: kube.KubeApi,
    namespace: str,
    node: str,
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    watch_pods: WatchPods,
) -> None:
    # "early" is created a second before "late" (creation times have whole seconds) but bound
    # after it: kubelet admits "early" first, and it must get the card bound for it. "going", older
    # still and bound to the other card, is being deleted while Pending: it is no candidate.
    created = {}
    for name, card_uuid, bind in (
        ("going", CARD_A, "2030-01-01T00:00:00Z"),
        ("early", CARD_B, "2030-01-01T00:00:02Z"),
        ("late", CARD_A, "2030-01-01T00:00:01Z"),
    ):
        recorded = Allocation("kserve-container", CardUUID(card_uuid), 0, H100_CUDA_TOTAL, 8 * GI)
        notes = {**allocations.encode([recorded]), names.ANNOTATION_BIND_TIME: bind}
        made = create_pod(control_plane, namespace, name, node, 8, **notes)
        created[name] = datetime.fromisoformat(made["metadata"]["creationTimestamp"])
        while datetime.now(UTC) < created[name] + timedelta(seconds=1):
            await asyncio.sleep(0.05)
    control_plane.rest().delete(f"/api/v1/namespaces/{namespace}/pods/going")
    del created["going"]
    batch = [
        NewPod(namespace, name, when, (("kserve-container", 8),))
        for name, when in created.items()
    ]
    pods = await watch_pods()
    assert any(p.deleting for p in pods.pods())
    async with running(make_agent(isolation="none", api=api, pods=pods, node=node), kubelet):
        answers = await kubelet.admit_batch(batch)
    assert answers["early", "kserve-container"].envs[names.ENV_VISIBLE_DEVICES] == CARD_B
    assert answers["late", "kserve-container"].envs[names.ENV_VISIBLE_DEVICES] == CARD_A


async def test_the_pod_cache_follows_the_watch(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    watch_pods: WatchPods,
) -> None:
    pods = await watch_pods()
    await asyncio.to_thread(create_pod, control_plane, namespace, "late", node, 1)
    await asyncio.to_thread(create_pod, control_plane, namespace, "elsewhere", "other-node", 1)
    await eventually(lambda: any(p.name == "late" for p in pods.pods()), "the new pod")
    assert {p.name for p in pods.pods()} == {"late"}
    await asyncio.to_thread(
        control_plane.rest().delete,
        f"/api/v1/namespaces/{namespace}/pods/late",
        gracePeriodSeconds=0,
    )
    await eventually(lambda: not pods.pods(), "the deletion")


@pytest.mark.parametrize("action", ["event", "evict"])
async def test_a_container_over_its_grant_gets_an_event_or_an_eviction(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    action: str,
    node_agent: NodeAgent,
    running_pod: RunningPod,
) -> None:
    uid = running_pod("greedy", {"pid": 777, "used": "6Gi"})
    agent = await node_agent(
        isolation="none",
        overuse_grace_seconds=0,
        overuse_action=action,
    )
    await agent.reconcile()
    await poll(agent)
    reason = watchdog.REASON if action == "event" else watchdog.EVICT_REASON
    (event,) = events(control_plane, namespace, reason)
    assert (
        event["type"] == "Warning" and "6 GiB" in event["message"] and "4 GiB" in event["message"]
    )
    assert event["involvedObject"]["uid"] == uid
    assert event["reportingComponent"] == names.DEVICE_PLUGIN_CONTROLLER
    after = control_plane.rest().get(f"/api/v1/namespaces/{namespace}/pods/greedy")
    assert ("deletionTimestamp" in after["metadata"]) == (action == "evict")
    labels = container_labels(node, namespace, "greedy")
    assert agent.metrics.registry.get_sample_value("gpushare_grant_violations_total", labels) == 1


@pytest.mark.parametrize(
    ("isolation", "kind", "used", "escape", "action"),
    [
        ("mps", "cuda", "2Gi", "outside-mps", "evict"),
        ("mps-shared", "mps-server", "66Mi", "own-mps-daemon", "evict"),
        ("mps", "mps-client", "9Gi", "over-limit", "evict"),
        ("mps", "cuda", "2Gi", "outside-mps", "event"),
    ],
    ids=["outside-mps", "own-mps-daemon", "over-limit", "outside-mps-event-only"],
)
async def test_an_escape_gets_an_event_naming_the_container_and_an_eviction_at_once(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    isolation: str,
    kind: str,
    used: str,
    escape: str,
    action: str,
    node_agent: NodeAgent,
    running_pod: RunningPod,
) -> None:
    uid = running_pod("tenant", {"pid": 778, "used": used, "kind": kind})
    agent = await node_agent(
        isolation=isolation,
        overuse_grace_seconds=3600,  # an escape is not over-use: no grace applies
        escape_action=action,
    )
    await agent.reconcile()
    await agent.poll()
    await agent.published()
    (event,) = events(control_plane, namespace, escapes.REASON)
    assert event["type"] == "Warning"
    assert event["involvedObject"]["uid"] == uid
    assert "container kserve-container" in event["message"]
    assert f"[{escape}]" in event["message"] and "778" in event["message"]
    after = control_plane.rest().get(f"/api/v1/namespaces/{namespace}/pods/tenant")
    assert ("deletionTimestamp" in after["metadata"]) == (action == "evict")
    await agent.poll()
    await agent.published()
    assert len(events(control_plane, namespace, escapes.REASON)) == 1  # once per episode
    labels = container_labels(node, namespace, "tenant", escape=escape)
    assert agent.metrics.registry.get_sample_value("gpushare_isolation_escapes_total", labels) == 1


async def test_the_node_report_names_the_isolation_and_the_cards_with_cgroup_limits(
    control_plane: cluster.ControlPlane,
    api: kube.KubeApi,
    node: str,
    make_agent: AgentFactory,
    nvml_file: Path,
) -> None:
    write_fake(nvml_file, [card(CARD_A, 0, memory_limits=True), card(CARD_B, 1)])
    agent = make_agent(isolation="auto", api=api, node=node)
    await agent.poll()
    await agent.published()
    report = read_report(control_plane, node)
    assert report.version == nodereport.VERSION == 2
    assert report.isolation == "mps"  # one card lacks per-cgroup limits
    assert [(c.uuid, c.memory_limits) for c in report.cards] == [(CARD_A, True), (CARD_B, False)]
