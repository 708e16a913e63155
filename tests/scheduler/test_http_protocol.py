"""The extender over real HTTP on loopback: kube-scheduler's JSON, exactly; bad input gets a 4xx."""

import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from gpushare.core import names
from gpushare.core.ids import NodeName
from gpushare.scheduler.service import Extender
from tests.scheduler.conftest import UNREACHABLE, kube_at
from tests.scheduler.objects import GI, SETTINGS, node, pod, report

PODS = "ns"


def _fill(ext: Extender) -> None:
    now = datetime.now(UTC)
    ext.book.set_node(NodeName("small"), report("small", 4, total=24 * GI, heartbeat=now))
    ext.book.set_node(NodeName("big"), report("big", 8, total=80 * GI, heartbeat=now))


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        text = await resp.text()
        if resp.content_type == "application/json":
            return resp.status, json.loads(text)
        return resp.status, text


async def test_filter_by_node_names(extender: Extender, http: aiohttp.ClientSession) -> None:
    _fill(extender)
    args = {"Pod": pod("a", 40), "Nodes": None, "NodeNames": ["small", "big", "ghost"]}
    status, answer = await _post(http, f"{extender.url}/filter", args)
    assert status == 200
    assert answer == {
        "Nodes": None,
        "NodeNames": ["big"],
        "FailedNodes": {
            "small": "no card with 40.1 GiB free: best is GPU 0 with 24 GiB",
            "ghost": "node is unknown to the gpushare ledger (no Node object seen yet)",
        },
        "FailedAndUnresolvableNodes": {},
        "Error": "",
    }


async def test_filter_by_whole_nodes_returns_them_unchanged(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    _fill(extender)
    small, big = node("small", report("small", 4)), node("big", report("big", 8))
    big["status"] = {"allocatable": {names.RESOURCE_GPU_MEMORY: "640"}}
    args = {
        "Pod": pod("a", 40),
        "Nodes": {"metadata": {}, "items": [small, big]},
        "NodeNames": None,
    }
    status, answer = await _post(http, f"{extender.url}/filter", args)
    assert status == 200
    assert answer["Nodes"] == {"metadata": {}, "items": [big]}
    assert answer["NodeNames"] is None
    assert list(answer["FailedNodes"]) == ["small"]


async def test_a_pod_larger_than_any_card_is_unresolvable_everywhere(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    _fill(extender)
    args = {"Pod": pod("huge", 100), "NodeNames": ["small", "big"]}
    status, answer = await _post(http, f"{extender.url}/filter", args)
    assert status == 200
    assert answer["NodeNames"] == []
    assert answer["FailedNodes"] == {}
    message = (
        "container 'kserve-container' asks for 100 GiB plus 66 MiB for its MPS server but the"
        " largest GPU in the cluster holds 80 GiB"
    )
    assert answer["FailedAndUnresolvableNodes"] == {"small": message, "big": message}


@pytest.mark.parametrize(
    ("bad_pod", "reason"),
    [
        (pod("a", "lots"), "'lots' is not a whole number of units"),
        (
            pod("a", 8, annotations={names.ANNOTATION_POLICY: "random"}),
            "is not a policy: write fill, binpack or spread",
        ),
    ],
    ids=["garbage-quantity", "unknown-policy"],
)
async def test_a_malformed_pod_fails_every_node_with_the_reason(
    extender: Extender, http: aiohttp.ClientSession, bad_pod: dict[str, Any], reason: str
) -> None:
    _fill(extender)
    status, answer = await _post(
        http, f"{extender.url}/filter", {"Pod": bad_pod, "NodeNames": ["small", "big"]}
    )
    assert status == 200
    assert answer["NodeNames"] == []
    assert set(answer["FailedAndUnresolvableNodes"]) == {"small", "big"}
    assert reason in answer["FailedAndUnresolvableNodes"]["big"]


async def test_prioritize_scores_fill_and_a_pods_own_policy(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    _fill(extender)
    args = {"Pod": pod("a", 20), "NodeNames": ["small", "big"]}
    status, answer = await _post(http, f"{extender.url}/prioritize", args)
    assert status == 200
    # fill, every card empty: 20 GiB fills a 24 GiB card to 84% (score 3 of the 0-3 that empty
    # cards get), an 80 GiB card to 25% (score 1).
    assert answer == [{"Host": "small", "Score": 3}, {"Host": "big", "Score": 1}]
    binpack = pod("a", 20, annotations={names.ANNOTATION_POLICY: "binpack"})
    _, answer = await _post(
        http, f"{extender.url}/prioritize", {"Pod": binpack, "NodeNames": ["small", "big"]}
    )
    # binpack: 84% full scores 8, 25% full scores 3.
    assert answer == [{"Host": "small", "Score": 8}, {"Host": "big", "Score": 3}]
    spread = pod("a", 20, annotations={names.ANNOTATION_POLICY: "spread"})
    _, answer = await _post(
        http, f"{extender.url}/prioritize", {"Pod": spread, "NodeNames": ["small", "big"]}
    )
    assert answer == [{"Host": "small", "Score": 2}, {"Host": "big", "Score": 7}]


async def test_prioritize_escapes_names_that_are_no_node_names(
    extender: Extender, http: aiohttp.ClientSession
) -> None:
    _fill(extender)
    names = ["big", 'we"ird\\', "ünicode"]
    _, answer = await _post(
        http, f"{extender.url}/prioritize", {"Pod": pod("a", 20), "NodeNames": names}
    )
    assert answer == [
        {"Host": "big", "Score": 1},
        {"Host": names[1], "Score": 0},
        {"Host": names[2], "Score": 0},
    ]


@pytest.mark.parametrize(
    ("verb", "body", "reason"),
    [
        ("filter", b"{not json", "ExtenderArgs: body: Invalid JSON"),
        ("filter", {"NodeNames": ["big"]}, "ExtenderArgs: Pod: Field required"),
        ("filter", {"Pod": None, "NodeNames": ["big"]}, "ExtenderArgs: Pod: Input should be"),
        ("filter", {"Pod": pod("a", 1)}, "the request has neither NodeNames nor Nodes"),
        (
            "filter",
            {"Pod": pod("a", 1), "Nodes": {"items": [{"spec": {}}]}},
            "Nodes.items[0] has no metadata.name",
        ),
        ("prioritize", [1, 2], "ExtenderArgs: body: Input should be an object"),
        ("prioritize", {"Pod": {"spec": {}}, "NodeNames": []}, "Pod.metadata: Field required"),
        ("bind", {"PodName": "a", "PodNamespace": "ns"}, "ExtenderBindingArgs: Node: Field"),
        ("bind", {"PodName": "", "PodNamespace": "ns", "Node": "n"}, "PodName: String should"),
        ("bind", b"", "ExtenderBindingArgs: body: Invalid JSON"),
    ],
    ids=[
        "not-json",
        "no-pod",
        "null-pod",
        "no-candidates",
        "nameless-node",
        "not-an-object",
        "pod-without-metadata",
        "bind-without-node",
        "bind-empty-name",
        "bind-empty-body",
    ],
)
async def test_bad_input_gets_400_with_the_reason(
    extender: Extender, http: aiohttp.ClientSession, verb: str, body: Any, reason: str
) -> None:
    _fill(extender)
    status, answer = await _post(http, f"{extender.url}/{verb}", body)
    assert status == 400
    assert reason in answer


async def test_probes_and_metrics(extender: Extender, http: aiohttp.ClientSession) -> None:
    _fill(extender)
    await _post(http, f"{extender.url}/filter", {"Pod": pod("a", 40), "NodeNames": ["small"]})
    base = f"http://127.0.0.1:{extender.port}"
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    assert 'gpushare_scheduler_filter_failures_total{reason="no-room"} 1.0' in text
    capacity = 'gpushare_scheduler_card_capacity_bytes{card="GPU-big-7",index="7",node="big"}'
    assert f"{capacity} 8.589934592e+10" in text
    assert 'gpushare_scheduler_nodes{state="ready"} 2.0' in text
    # Every label set exists from the start, so that dashboards and alerts see zeros.
    assert 'gpushare_scheduler_watch_restarts_total{cause="expired",resource="pods"} 0.0' in text
    assert 'gpushare_scheduler_binds_total{result="no-fit"} 0.0' in text
    assert 'gpushare_scheduler_request_duration_seconds_count{verb="filter"} 1.0' in text


async def test_an_extender_that_has_not_listed_the_cluster_refuses_to_decide(
    http: aiohttp.ClientSession,
) -> None:
    kube = kube_at(UNREACHABLE)
    async with Extender(SETTINGS, kube) as ext:
        await ext.start()
        _fill(ext)
        base = f"http://127.0.0.1:{ext.port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
        _, answer = await _post(
            http, f"{ext.url}/filter", {"Pod": pod("a", 1), "NodeNames": ["big"]}
        )
        assert answer["Error"].startswith("gpushare extender is starting")
        assert answer["NodeNames"] is None
        _, answer = await _post(
            http,
            f"{ext.url}/bind",
            {"PodName": "a", "PodNamespace": PODS, "PodUID": "u", "Node": "big"},
        )
        assert set(answer) == {"Error"}
        assert answer["Error"].startswith("gpushare extender is starting")
        assert ext.book.grant_count() == 0
    await kube.close()
