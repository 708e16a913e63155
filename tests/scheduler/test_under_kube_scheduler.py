"""The extender under the real kube-scheduler and apiserver, loaded from our manifest.

The extender runs as ``gpushare scheduler`` in its own process; kube-scheduler runs the
KubeSchedulerConfiguration of ``manifests/scheduler`` with its URL pointed at it. GPU nodes are
Node objects with an agent report; pods look as the webhook leaves them.
"""

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpushare.core import names, nodereport
from tests import cluster
from tests.scheduler.extender import ExtenderProcess, kube_scheduler, started
from tests.scheduler.objects import GI, OVERHEAD, pod

CARD_80 = 80 * GI
CARD_24 = 24 * GI
SIZES = (20, 8, 12, 4, 40, 16, 24, 10, 6, 30)
"""GiB asked by successive pods: 170 GiB per ten, from a quarter of an L4 to half an H100."""


@pytest.fixture
def extender(control_plane: cluster.ControlPlane, tmp_path: Path) -> Iterator[ExtenderProcess]:
    with started(control_plane, tmp_path) as process:
        yield process


def gpu_nodes(
    control_plane: cluster.ControlPlane, namespace: str, layout: dict[str, tuple[int, int]]
) -> dict[str, nodereport.NodeReport]:
    """Register ``{suffix: (cards, bytes per card)}`` as nodes owned by the test's namespace."""
    reports = {}
    for suffix, (count, size) in layout.items():
        name = f"{namespace}-{suffix}"
        model = "NVIDIA H100 80GB HBM3" if size == CARD_80 else "NVIDIA L4"
        cards = [cluster.gpu_card(i, total=size, model=model) for i in range(count)]
        report = cluster.node_report(cards)
        cluster.register_gpu_node(control_plane, name, cards, report=report, owner=namespace)
        reports[name] = report
    return reports


def create_pods(rest: cluster.Rest, namespace: str, sizes: list[int], prefix: str = "p") -> None:
    for i, units in enumerate(sizes):
        rest.create(
            f"/api/v1/namespaces/{namespace}/pods", pod(f"{prefix}{i}", units, namespace=namespace)
        )


def list_pods(rest: cluster.Rest, namespace: str) -> list[dict[str, Any]]:
    return list(rest.get(f"/api/v1/namespaces/{namespace}/pods")["items"])


def wait_bound(
    rest: cluster.Rest, namespace: str, count: int, timeout: float = 180
) -> list[dict[str, Any]]:
    def bound() -> list[dict[str, Any]] | None:
        pods = list_pods(rest, namespace)
        done = [p for p in pods if p["spec"].get("nodeName")]
        return pods if len(done) == count and len(pods) == count else None

    return cluster.wait_for(bound, timeout=timeout, interval=0.5, what=f"{count} pods bound")


def second_bound(rest: cluster.Rest, namespace: str) -> bool:
    """Whether ``second0`` already holds first0's card (the release came before this look)."""
    return any(
        p["metadata"]["name"] == "second0" and p["spec"].get("nodeName")
        for p in list_pods(rest, namespace)
    )


def check_grants(
    pods: list[dict[str, Any]], reports: dict[str, nodereport.NodeReport]
) -> Counter[str]:
    """Each bound pod's annotations name a card of its node; no card holds more than it has."""
    capacity = {str(c.uuid): (node, c) for node, rep in reports.items() for c in rep.cards}
    granted: Counter[str] = Counter()
    for p in pods:
        notes = p["metadata"]["annotations"]
        units = int(p["spec"]["containers"][0]["resources"]["limits"][names.RESOURCE_GPU_MEMORY])
        node, card = capacity[notes[names.ANNOTATION_CARD_UUID]]
        assert node == p["spec"]["nodeName"]
        assert notes[names.ANNOTATION_CARD_INDEX] == str(card.index)
        assert notes[names.ANNOTATION_CARD_TOTAL] == str(card.cuda_total_bytes)
        assert notes[names.ANNOTATION_GRANTED_BYTES] == str(units * GI)
        assert notes[names.ANNOTATION_BIND_TIME].endswith("Z")
        granted[card.uuid] += units * GI + OVERHEAD
    for uuid, used in granted.items():
        assert used <= capacity[uuid][1].cuda_total_bytes, f"card {uuid} over-committed"
    return granted


def events(rest: cluster.Rest, namespace: str, reason: str) -> list[dict[str, Any]]:
    items = rest.get(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e.get("reason") == reason]


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def granted_on(extender: ExtenderProcess, node: str) -> float:
    """What the extender's ledger holds granted on ``node``'s cards."""
    series = "gpushare_scheduler_card_granted_bytes{"
    label = f'node="{node}"'
    lines = extender.metrics().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(series) and label in line
    )


MIXED = {**{f"h{i}": (8, CARD_80) for i in range(4)}, **{f"l{i}": (4, CARD_24) for i in range(4)}}


def test_a_hundred_pods_are_bound_with_their_cards(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    reports = gpu_nodes(control_plane, namespace, MIXED)
    with kube_scheduler(control_plane, extender):
        create_pods(rest, namespace, [SIZES[i % len(SIZES)] for i in range(100)])
        pods = wait_bound(rest, namespace, 100)
    granted = check_grants(pods, reports)
    # The extender's ledger agrees with the API, card by card.
    text = extender.metrics()
    assert metric_sum(text, "gpushare_scheduler_card_granted_bytes") == sum(granted.values())
    # fill: a pod that opens a card opens the smallest that fits, so the 24 GiB cards take some.
    assert sum(1 for p in pods if p["spec"]["nodeName"].endswith(("-l0", "-l1", "-l2", "-l3"))) > 0
    cluster.wait_for(
        lambda: len(events(rest, namespace, "GPUMemoryGranted")) >= 100,
        timeout=30,
        what="an Event per pod",
    )
    note = events(rest, namespace, "GPUMemoryGranted")[0]["note"]
    assert note.startswith("granted ") and "fill chose the card in use left fullest" in note


def test_a_pod_larger_than_any_card_stays_pending_with_the_reason(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    gpu_nodes(control_plane, namespace, {"h0": (2, CARD_80), "l0": (4, CARD_24)})
    with kube_scheduler(control_plane, extender):
        rest.create(f"/api/v1/namespaces/{namespace}/pods", pod("huge", 100, namespace=namespace))

        def failed() -> list[dict[str, Any]] | None:
            return events(rest, namespace, "FailedScheduling") or None

        event = cluster.wait_for(failed, timeout=60, what="FailedScheduling")[0]
        reason = (
            "asks for 100 GiB plus 66 MiB for its MPS server but the largest GPU in the cluster"
        )
        assert reason in event["note"]
        assert rest.get(f"/api/v1/namespaces/{namespace}/pods/huge")["spec"].get("nodeName") is None


def test_deleting_pods_frees_their_memory_for_new_ones(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    # Two 24 GiB cards, 14 GiB on each: the node's total keeps 20 units, so kube-scheduler's own
    # count lets a 12 GiB pod through to the extender, which finds no card with room.
    reports = gpu_nodes(control_plane, namespace, {"l0": (2, CARD_24)})
    with kube_scheduler(control_plane, extender):
        create_pods(rest, namespace, [14, 14], prefix="first")
        wait_bound(rest, namespace, 2)
        create_pods(rest, namespace, [12], prefix="second")
        event = cluster.wait_for(
            lambda: events(rest, namespace, "FailedScheduling") or None,
            timeout=60,
            what="FailedScheduling",
        )[0]
        assert "no card with 12.1 GiB free: best is GPU 0 with 9.9 GiB" in event["note"]
        (node,) = reports
        held = granted_on(extender, node)
        assert held > 0
        rest.delete(f"/api/v1/namespaces/{namespace}/pods/first0", gracePeriodSeconds=0)
        cluster.wait_for(
            lambda: granted_on(extender, node) < held or second_bound(rest, namespace),
            timeout=60,
            what="the extender to release first0's memory",
        )
        # kube-scheduler may retry second0 on first0's deletion before the extender's own watch
        # has released it; in a cluster the agent's next report (its card's use dropped) is the
        # Node update that requeues it. Write that report, as the agent would.
        cluster.set_node_report(control_plane, node, cluster.node_report(reports[node].cards))
        pods = wait_bound(rest, namespace, 2)
    assert {p["metadata"]["name"] for p in pods} == {"first1", "second0"}
    check_grants(pods, reports)


def test_an_extender_restart_mid_burst_loses_and_doubles_nothing(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    reports = gpu_nodes(control_plane, namespace, MIXED)
    sizes = [SIZES[i % len(SIZES)] for i in range(80)]
    with kube_scheduler(control_plane, extender), ThreadPoolExecutor(1) as creator:
        # Pods keep arriving while the extender dies and comes back.
        created = creator.submit(create_pods, control_plane.rest(), namespace, sizes)

        def bound() -> int:
            return sum(1 for p in list_pods(rest, namespace) if p["spec"].get("nodeName"))

        cluster.wait_for(lambda: bound() >= 10, timeout=60, what="10 pods bound")
        extender.kill()
        assert bound() < 80  # the burst was still going
        extender.start()
        created.result()
        pods = wait_bound(rest, namespace, 80)
    granted = check_grants(pods, reports)
    text = extender.metrics()
    assert metric_sum(text, "gpushare_scheduler_card_granted_bytes") == sum(granted.values())
    assert metric_sum(text, "gpushare_scheduler_pods_granted") == 80


async def test_concurrent_binds_never_overcommit_a_card(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    node = f"{namespace}-l0"
    gpu_nodes(control_plane, namespace, {"l0": (1, CARD_24)})
    uids = {}
    for i in range(10):
        created = rest.create(
            f"/api/v1/namespaces/{namespace}/pods",
            pod(f"c{i}", 8, namespace=namespace, scheduler="nobody"),
        )
        uids[f"c{i}"] = created["metadata"]["uid"]

    async def bind(http: aiohttp.ClientSession, name: str) -> str:
        args = {"PodName": name, "PodNamespace": namespace, "PodUID": uids[name], "Node": node}
        async with http.post(f"{extender.url}/bind", json=args) as resp:
            assert resp.status == 200
            return str((await resp.json())["Error"])

    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(bind(http, name) for name in uids))
    # 8 GiB plus 66 MiB twice fits 24 GiB; three times does not.
    assert sum(1 for a in answers if a == "") == 2
    refusals = [a for a in answers if a]
    assert all("no card with 8.1 GiB free: best is GPU 0 with 7.9 GiB" in a for a in refusals)
    bound = [p for p in list_pods(rest, namespace) if p["spec"].get("nodeName")]
    assert len(bound) == 2


def _revision(name: str, units: int, namespace: str, template_hash: str) -> dict[str, Any]:
    """A pod of Deployment ``web``'s revision ``template_hash``, as its ReplicaSet makes it."""
    body = pod(name, units, namespace=namespace)
    body["metadata"]["labels"] = {"app": "web", "pod-template-hash": template_hash}
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"web-{template_hash}",
         "uid": f"00000000-0000-4000-8000-{template_hash:0>12}", "controller": True}
    ]  # fmt: skip
    return body


def test_a_rollout_on_a_full_card_names_the_setting_that_lets_it_finish(
    control_plane: cluster.ControlPlane, namespace: str, extender: ExtenderProcess
) -> None:
    rest = control_plane.rest()
    pods = f"/api/v1/namespaces/{namespace}/pods"
    # Two cards: the node's total has room for 60 GiB more (kube-scheduler lets the pod through
    # to the extender), no card has (the extender refuses it).
    gpu_nodes(control_plane, namespace, {"h0": (2, CARD_80)})
    with kube_scheduler(control_plane, extender):
        rest.create(pods, _revision("web-old", 60, namespace, "5d4b9c7f8a"))
        rest.create(pods, pod("filler", 30, namespace=namespace))

        def both_bound() -> bool:
            return all(
                rest.get(f"{pods}/{n}")["spec"].get("nodeName") for n in ("web-old", "filler")
            )

        cluster.wait_for(both_bound, timeout=60, what="web-old and filler bound")
        # The new revision's pod cannot fit beside the old one: the reason names maxSurge.
        rest.create(pods, _revision("web-new", 60, namespace, "6f8c2d9b1e"))
        # Another Deployment's pod that does not fit is told no more than that.
        other = pod("batch", 60, namespace=namespace)
        rest.create(pods, other)

        def notes() -> dict[str, str] | None:
            found = {
                e["regarding"]["name"]: e["note"]
                for e in events(rest, namespace, "FailedScheduling")
            }
            return found if {"web-new", "batch"} <= set(found) else None

        found = cluster.wait_for(notes, timeout=60, what="FailedScheduling for both")
    assert "no card with 60.1 GiB free" in found["web-new"]
    assert "maxSurge: 0 replaces pods in place" in found["web-new"]
    assert "no card with 60.1 GiB free" in found["batch"]
    assert "maxSurge" not in found["batch"]
