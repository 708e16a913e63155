"""Faults a real apiserver will not produce on demand, from kmock's emulator: 500s, dropped
watches, 410 Gone, a Binding refused or already made."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kmock
import pytest
from prometheus_client import CollectorRegistry

from gpushare.core import names
from gpushare.core.ids import CardUUID, NodeName
from gpushare.scheduler import ledger
from gpushare.scheduler.metrics import Metrics
from gpushare.scheduler.service import Extender
from gpushare.scheduler.watching import Watcher
from tests.scheduler.conftest import kube_at
from tests.scheduler.objects import GI, OVERHEAD, SETTINGS, node, pod, report, request

PODS = kmock.resource("v1/pods")
NODES = kmock.resource("v1/nodes")
BINDING = "post /api/v1/namespaces/ns/pods/p1/binding"


def _bound(name: str, uid: str, card: str, node_name: str, units: int) -> dict[str, Any]:
    return pod(
        name,
        units,
        uid=uid,
        node=node_name,
        annotations={
            names.ANNOTATION_CARD_UUID: card,
            names.ANNOTATION_CARD_INDEX: card.rsplit("-", 1)[1],
            names.ANNOTATION_CARD_TOTAL: str(80 * GI),
            names.ANNOTATION_GRANTED_BYTES: str(units * GI),
            names.ANNOTATION_BIND_TIME: "2026-01-01T12:00:00.000Z",
        },
    )


@pytest.fixture
async def api() -> AsyncIterator[kmock.KubernetesEmulator]:
    """kmock's Kubernetes emulator with two GPU nodes, one bound pod and one pending."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        emulator.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod")
        emulator.resources["v1/nodes"] = kmock.ResourceInfo(namespaced=False, kind="Node")
        fresh = datetime.now(UTC)
        for name in ("n1", "n2"):
            emulator.objects[NODES, None, name] = node(name, report(name, 2, heartbeat=fresh))
        emulator.objects[PODS, "ns", "bound"] = _bound("bound", "u-bound", "GPU-n1-0", "n1", 30)
        emulator.objects[PODS, "ns", "p1"] = pod("p1", 10, uid="u-p1")
        yield emulator


class _Watching:
    def __init__(self, api: kmock.KubernetesEmulator) -> None:
        self.kube = kube_at(str(api.url))
        self.book = ledger.Ledger(overhead_bytes=OVERHEAD, heartbeat_timeout_seconds=300)
        self.metrics = Metrics(CollectorRegistry(), self.book)
        self.watcher = Watcher(
            kube=self.kube,
            book=self.book,
            settings=SETTINGS,
            metrics=self.metrics,
            backoff=(0.01, 0.05),
        )
        self.task = asyncio.get_running_loop().create_task(self.watcher.run())

    def restarts(self, resource: str, cause: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gpushare_scheduler_watch_restarts_total", {"resource": resource, "cause": cause}
        )
        return value or 0.0

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.kube.close()


@pytest.fixture
async def watching(api: kmock.KubernetesEmulator) -> AsyncIterator[_Watching]:
    state = _Watching(api)
    yield state
    await state.close()


async def _until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_ledger_is_rebuilt_from_pod_annotations(watching: _Watching) -> None:
    await asyncio.wait_for(watching.watcher.wait_synced(), 10)
    assert watching.book.holdings() == {
        "u-bound": (
            NodeName("n1"),
            (ledger.Allocation("kserve-container", CardUUID("GPU-n1-0"), 0, 80 * GI, 30 * GI),),
        )
    }
    assert watching.book.request("u-p1") is not None  # pending: kept for its bind
    assert sorted(watching.book.node_names()) == ["n1", "n2"]


async def test_a_bound_pod_keeps_its_memory_whatever_its_policy_annotation_says(
    api: kmock.KubernetesEmulator,
) -> None:
    odd = _bound("odd", "u-odd", "GPU-n2-0", "n2", 40)
    odd["metadata"]["annotations"][names.ANNOTATION_POLICY] = "whatever"
    api.objects[PODS, "ns", "odd"] = odd
    state = _Watching(api)
    try:
        await asyncio.wait_for(state.watcher.wait_synced(), 10)
        assert set(state.book.holdings()) == {"u-bound", "u-odd"}
    finally:
        await state.close()


async def test_server_errors_on_list_are_retried_with_backoff(
    api: kmock.KubernetesEmulator,
) -> None:
    api["list", PODS][:2] << 500
    state = _Watching(api)
    try:
        await asyncio.wait_for(state.watcher.wait_synced(), 10)
        assert state.restarts("pods", "error") == 2
        assert "u-bound" in state.book.holdings()
    finally:
        await state.close()


async def test_gone_lists_again_and_forgets_what_vanished_meanwhile(
    api: kmock.KubernetesEmulator,
) -> None:
    # The first watch of pods only says 410 Gone: whatever changed since the list is unknown.
    api["watch", PODS][:1] << (
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "code": 410,
                "reason": "Expired",
                "message": "too old resource version",
            },
        },
    )
    api["list", PODS][:1] << {
        "metadata": {"resourceVersion": "1"},
        "items": [
            _bound("bound", "u-bound", "GPU-n1-0", "n1", 30),
            _bound("gone", "u-gone", "GPU-n2-1", "n2", 50),  # deleted while the watch was down
        ],
    }
    state = _Watching(api)
    try:
        await _until(lambda: state.restarts("pods", "expired") == 1 and len(api["list", PODS]) == 2)
        await _until(lambda: "u-gone" not in state.book.holdings())
        assert set(state.book.holdings()) == {"u-bound"}
        assert state.book.card_usage()[(NodeName("n2"), CardUUID("GPU-n2-1"))][0] == 0
    finally:
        await state.close()


async def test_a_dropped_watch_is_resumed_and_sees_later_changes(
    api: kmock.KubernetesEmulator,
) -> None:
    # Three watches that end after a bookmark, as dropped connections do.
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "7"}}}
    api["watch", PODS][:3] << (bookmark,)
    state = _Watching(api)
    try:
        await asyncio.wait_for(state.watcher.wait_synced(), 10)
        await _until(lambda: len(api["watch", PODS]) >= 4)
        assert state.restarts("pods", "end") >= 3
        assert len(api["list", PODS]) == 1  # resumed from its version, not listed again
        async with aiohttp.ClientSession() as http:
            done = _bound("p1", "u-p1", "GPU-n2-0", "n2", 10)
            async with http.patch(f"{api.url}/api/v1/namespaces/ns/pods/p1", json=done) as resp:
                assert resp.status == 200
            await _until(lambda: "u-p1" in state.book.holdings())
            async with http.delete(f"{api.url}/api/v1/namespaces/ns/pods/bound") as resp:
                assert resp.status == 200
            await _until(lambda: "u-bound" not in state.book.holdings())
    finally:
        await state.close()


async def test_a_pod_that_finishes_gives_its_memory_back(
    watching: _Watching, api: kmock.KubernetesEmulator
) -> None:
    await asyncio.wait_for(watching.watcher.wait_synced(), 10)
    async with aiohttp.ClientSession() as http:
        patch = {"status": {"phase": "Succeeded"}}
        async with http.patch(f"{api.url}/api/v1/namespaces/ns/pods/bound", json=patch) as resp:
            assert resp.status == 200
    await _until(lambda: watching.book.grant_count() == 0)


async def test_a_garbled_node_report_fails_the_node_with_the_reason(
    api: kmock.KubernetesEmulator, watching: _Watching
) -> None:
    api.objects[NODES, None, "junk"] = node("junk", "{not json")
    api.objects[NODES, None, "future"] = node(
        "future", json.dumps({"version": 99, "heartbeat": "2026-01-01T00:00:00Z", "cards": []})
    )
    await asyncio.wait_for(watching.watcher.wait_synced(), 10)
    junk = watching.book.check(NodeName("junk"), request(1), policy="binpack")
    future = watching.book.check(NodeName("future"), request(1), policy="binpack")
    assert junk is not None and junk.message.startswith("node report is not JSON")
    assert future is not None and "newer than this reader understands" in future.message


# --- bind -----------------------------------------------------------------------------------------


@pytest.fixture
async def extender(api: kmock.KubernetesEmulator) -> AsyncIterator[Extender]:
    kube = kube_at(str(api.url))
    ext = Extender(SETTINGS, kube)
    await ext.start()
    await asyncio.wait_for(ext.watcher.wait_synced(), 10)
    yield ext
    await ext.stop()
    await kube.close()


async def _bind(ext: Extender, node_name: str = "n2", uid: str = "u-p1") -> str:
    args = {"PodName": "p1", "PodNamespace": "ns", "PodUID": uid, "Node": node_name}
    async with aiohttp.ClientSession() as http, http.post(f"{ext.url}/bind", json=args) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert set(answer) == {"Error"}
    return str(answer["Error"])


def _binds(ext: Extender, result: str) -> float:
    value = ext.metrics.registry.get_sample_value(
        "gpushare_scheduler_binds_total", {"result": result}
    )
    return value or 0.0


async def test_a_refused_binding_gives_the_card_back_and_says_why(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    (
        api[BINDING][:1]
        << 500
        << {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd is on fire"}
    )
    error = await _bind(extender)
    assert error == "binding pod ns/p1 to node n2 failed: 500 InternalError: etcd is on fire"
    assert extender.book.grant("u-p1") is None
    assert _binds(extender, "api-error") == 1


async def test_a_binding_carries_the_card_and_an_event_says_which(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    api[BINDING] << 201 << {"kind": "Status", "status": "Success"}
    assert await _bind(extender) == ""
    posted = next(iter(api[BINDING])).data
    grant = extender.book.grant("u-p1")
    assert grant is not None and grant.state == "bound"
    card = grant.allocations[0]
    assert posted["metadata"]["uid"] == "u-p1"
    assert posted["target"] == {"apiVersion": "v1", "kind": "Node", "name": "n2"}
    notes = posted["metadata"]["annotations"]
    assert notes[names.ANNOTATION_CARD_UUID] == card.card
    assert notes[names.ANNOTATION_CARD_INDEX] == str(card.index)
    assert notes[names.ANNOTATION_CARD_TOTAL] == str(80 * GI)
    assert notes[names.ANNOTATION_GRANTED_BYTES] == str(10 * GI)
    assert notes[names.ANNOTATION_BIND_TIME].endswith("Z")
    await extender.binder.close()
    events = [r.data for r in api["post", kmock.resource("events.k8s.io/v1/events")]]
    assert len(events) == 1
    assert events[0]["reason"] == "GPUMemoryGranted"
    assert events[0]["regarding"]["uid"] == "u-p1"
    assert events[0]["note"] == (
        f"granted 10 GiB for 'kserve-container' on GPU {card.index} ({card.card}, 80 GiB) of node"
        " n2: fill chose the card in use left fullest, else the smallest empty card that fits"
    )
    assert _binds(extender, "bound") == 1


async def test_a_retried_bind_that_already_landed_succeeds(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    # The first attempt's Binding landed, but its answer was lost: the pod sits on n2.
    api.objects[PODS, "ns", "p1"] = _bound("p1", "u-p1", "GPU-n2-1", "n2", 10)
    (
        api[BINDING]
        << 409
        << {
            "kind": "Status",
            "code": 409,
            "reason": "Conflict",
            "message": 'pod p1 is already assigned to node "n2"',
        }
    )
    assert await _bind(extender) == ""
    grant = extender.book.grant("u-p1")
    assert grant is not None
    assert grant.allocations[0].card == "GPU-n2-1"  # the API's truth, not the fresh choice
    assert extender.book.card_usage()[(NodeName("n2"), CardUUID("GPU-n2-0"))][0] == 0


async def test_a_pod_bound_elsewhere_meanwhile_is_refused(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    # Another scheduler bound it to n1; the watch tells the ledger before kube-scheduler's bind.
    async with aiohttp.ClientSession() as http:
        bound = _bound("p1", "u-p1", "GPU-n1-1", "n1", 10)
        async with http.patch(f"{api.url}/api/v1/namespaces/ns/pods/p1", json=bound) as resp:
            assert resp.status == 200
    await _until(lambda: extender.book.grant("u-p1") is not None)
    error = await _bind(extender)
    assert error == "pod ns/p1 already holds GPU memory on node n1"
    assert len(api[BINDING]) == 0
    assert _binds(extender, "conflict") == 1


async def test_a_bind_for_a_pod_never_seen_reads_it_first(api: kmock.KubernetesEmulator) -> None:
    api[BINDING] << 201 << {"kind": "Status", "status": "Success"}
    kube = kube_at(str(api.url))
    async with Extender(SETTINGS, kube, watch=False) as ext:  # a ledger that saw no pod
        await ext.start()
        ext.book.set_node(NodeName("n2"), report("n2", 2, heartbeat=datetime.now(UTC)))
        error = await _bind(ext, uid="recreated")
        assert error == "pod ns/p1: has UID u-p1, not recreated: it was deleted and recreated"
        assert await _bind(ext) == ""
        assert len(api["get /api/v1/namespaces/ns/pods/p1"]) == 2
        assert ext.book.grant("u-p1") is not None
    await kube.close()


async def test_a_bind_that_does_not_fit_is_refused_and_counts_nothing(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    api.objects[PODS, "ns", "p1"] = pod("p1", 80, uid="u-p1")
    extender.book.forget("u-p1")
    error = await _bind(extender, node_name="n2")
    assert error == (
        "node n2 cannot take pod ns/p1: no card with 80.1 GiB free: best is GPU 0 with 80 GiB"
    )
    assert extender.book.grant("u-p1") is None
    assert len(api[BINDING]) == 0
    assert _binds(extender, "no-fit") == 1


async def _bind_pods(ext: Extender, api: kmock.KubernetesEmulator, pods: list[str]) -> None:
    for name in pods:
        api.objects[PODS, "ns", name] = pod(name, 10, uid=f"u-{name}")
        api[f"post /api/v1/namespaces/ns/pods/{name}/binding"] << 201 << {"status": "Success"}
    async with aiohttp.ClientSession() as http:
        for name in pods:
            args = {"PodName": name, "PodNamespace": "ns", "PodUID": f"u-{name}", "Node": "n2"}
            async with http.post(f"{ext.url}/bind", json=args) as resp:
                assert (await resp.json())["Error"] == ""


def _event_subjects(api: kmock.KubernetesEmulator) -> list[str]:
    events = api["post", kmock.resource("events.k8s.io/v1/events")]
    return [request.data["regarding"]["name"] for request in events]


async def test_events_wait_for_a_pause_in_binds_and_none_is_lost(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    extender.binder.event_idle_seconds = 3600.0  # a burst that does not pause
    await _bind_pods(extender, api, ["q1", "q2", "q3"])
    await asyncio.sleep(0.2)
    assert _event_subjects(api) == []
    await extender.binder.close()
    assert _event_subjects(api) == ["q1", "q2", "q3"]


async def test_a_full_backlog_of_events_is_posted_even_in_a_burst(
    api: kmock.KubernetesEmulator, extender: Extender
) -> None:
    extender.binder.event_idle_seconds = 3600.0
    extender.binder.event_backlog = 2
    await _bind_pods(extender, api, ["q1", "q2", "q3"])
    await _until(lambda: len(_event_subjects(api)) >= 2)
    assert _event_subjects(api)[:2] == ["q1", "q2"]
