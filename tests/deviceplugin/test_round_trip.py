"""A pod with two memory containers, end to end: the real kube-scheduler and the extender bind it,
the real plugin hands each container its own card, reconciliation rewrites what kubelet changed
(``gpushare.io/allocations`` included), and a restarted extender rebuilds its ledger from that."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import allocations, names
from gpushare.core.ids import pod_key
from gpushare.deviceplugin import kube
from tests import cluster
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    H100_RESERVED,
    H100_TOTAL,
    AgentFactory,
    allocate_request,
    running,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.scheduler.extender import ExtenderProcess, kube_scheduler, started
from tests.scheduler.objects import OVERHEAD, pod

CARDS = {CARD_A: 0, CARD_B: 1}


@pytest.fixture
def extender(control_plane: cluster.ControlPlane, tmp_path: Path) -> Iterator[ExtenderProcess]:
    with started(control_plane, tmp_path) as process:
        yield process


def granted_by_card(extender: ExtenderProcess, node: str) -> dict[str, float]:
    """The extender's ledger: bytes granted per card of ``node`` (grants plus overhead)."""
    result = {}
    for line in extender.metrics().splitlines():
        if line.startswith("gpushare_scheduler_card_granted_bytes{") and f'node="{node}"' in line:
            uuid = line.split('card="', 1)[1].split('"', 1)[0]
            result[uuid] = float(line.rsplit(" ", 1)[1])
    return result


def read_pod(cp: cluster.ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return cp.rest().get(f"/api/v1/namespaces/{namespace}/pods/{name}")


async def test_a_two_container_pod_round_trips_between_extender_plugin_and_ledger(
    control_plane: cluster.ControlPlane,
    namespace: str,
    extender: ExtenderProcess,
    make_agent: AgentFactory,
    kubelet: TestKubelet,
) -> None:
    node = f"{namespace}-gpu"
    cards = [
        cluster.gpu_card(i, uuid=u, total=H100_TOTAL, reserved=H100_RESERVED)
        for u, i in CARDS.items()
    ]
    cluster.register_gpu_node(control_plane, node, cards, owner=namespace)
    body = pod("two", 20, namespace=namespace, extra_containers={"sidecar": 10})
    with kube_scheduler(control_plane, extender):
        control_plane.rest().create(f"/api/v1/namespaces/{namespace}/pods", body)
        bound = cluster.wait_for(
            lambda: read_pod(control_plane, namespace, "two")["spec"].get("nodeName"),
            timeout=60,
            what="the pod bound",
        )
    assert bound == node
    notes = read_pod(control_plane, namespace, "two")["metadata"]["annotations"]
    chosen = allocations.decode(notes, ["kserve-container", "sidecar"])
    assert chosen is not None and [a.container for a in chosen] == ["kserve-container", "sidecar"]
    vllm_card = chosen[0].card

    api = await kube.KubeApi.connect(control_plane.kubeconfig)
    pods = kube.PodCache(api, node)
    watch = asyncio.create_task(pods.run())
    try:
        await asyncio.wait_for(pods.synced.wait(), 10)
        agent = make_agent(isolation="none", api=api, pods=pods, node=node)
        async with running(agent, kubelet):
            # kubelet admits the vLLM container on the card the extender chose for it...
            answer = await kubelet.admit(namespace, "two", "kserve-container", 20)
            assert answer.envs[names.ENV_VISIBLE_DEVICES] == vllm_card
            # ...and hands the sidecar units of the other card, whatever was preferred.
            other = next(u for u in CARDS if u != vllm_card)
            ids = [f"{other}-{u}" for u in range(10)]
            assert kubelet.stub is not None
            await kubelet.stub.Allocate(allocate_request(*ids))
            kubelet.hold(pod_key(namespace, "two"), "sidecar", ids)
            await agent.reconcile()
    finally:
        watch.cancel()
        await api.close()

    notes = read_pod(control_plane, namespace, "two")["metadata"]["annotations"]
    truth = allocations.decode(notes, ["kserve-container", "sidecar"])
    assert truth is not None
    assert [(a.container, a.card, a.granted_bytes) for a in truth] == [
        ("kserve-container", vllm_card, 20 * GI),
        ("sidecar", other, 10 * GI),
    ]
    # The pod-level keys still describe the first container alone.
    assert notes[names.ANNOTATION_CARD_UUID] == vllm_card
    assert notes[names.ANNOTATION_GRANTED_BYTES] == str(20 * GI)

    # A restarted extender reads the corrected allocations back into its ledger.
    extender.kill()
    extender.start()
    ledger = cluster.wait_for(
        lambda: granted_by_card(extender, node) or None, timeout=30, what="the ledger rebuilt"
    )
    assert ledger == {vllm_card: 20 * GI + OVERHEAD, other: 10 * GI + OVERHEAD}
