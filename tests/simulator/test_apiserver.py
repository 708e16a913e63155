"""The in-memory API server serves the parts' real Kubernetes clients."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.simulator import apiserver, patches, selectors


@pytest.fixture
async def server() -> AsyncIterator[apiserver.ApiServer]:
    api = apiserver.ApiServer()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def core(server: apiserver.ApiServer, tmp_path: Path) -> AsyncIterator[client.CoreV1Api]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(server.kubeconfig())
    api_client = await config.new_client_from_config(config_file=str(kubeconfig))
    async with api_client:
        yield client.CoreV1Api(api_client)


def _pod(name: str, node: str | None = None, **labels: str) -> Any:
    spec: dict[str, object] = {"containers": [{"name": "main", "image": "vllm"}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels}, "spec": spec}


async def test_created_pods_come_back_with_server_fields(core: client.CoreV1Api) -> None:
    created = await core.create_namespaced_pod("ns", _pod("a"))
    assert created.metadata.uid and created.metadata.resource_version
    assert created.status.phase == "Pending"
    read = await core.read_namespaced_pod("a", "ns")
    assert read.metadata.uid == created.metadata.uid


async def test_a_second_create_conflicts_and_a_missing_pod_is_404(core: client.CoreV1Api) -> None:
    await core.create_namespaced_pod("ns", _pod("a"))
    with pytest.raises(ApiException) as conflict:
        await core.create_namespaced_pod("ns", _pod("a"))
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as missing:
        await core.read_namespaced_pod("b", "ns")
    assert missing.value.status == 404
    assert json.loads(missing.value.body or b"{}")["reason"] == "NotFound"


async def test_selectors_filter_lists(core: client.CoreV1Api) -> None:
    await core.create_namespaced_pod("ns", _pod("a", node="n1", app="x"))
    await core.create_namespaced_pod("ns", _pod("b", node="n2", app="y"))
    await core.create_namespaced_pod("other", _pod("c", node="n1"))
    by_field = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert sorted(p.metadata.name for p in by_field.items) == ["a", "c"]
    by_label = await core.list_namespaced_pod("ns", label_selector="app in (x,z)")
    assert [p.metadata.name for p in by_label.items] == ["a"]
    negated = await core.list_pod_for_all_namespaces(label_selector="app!=x")
    assert sorted(p.metadata.name for p in negated.items) == ["b", "c"]


async def test_patches_merge_annotations(core: client.CoreV1Api) -> None:
    await core.create_namespaced_pod("ns", _pod("a"))
    await core.patch_namespaced_pod("a", "ns", {"metadata": {"annotations": {"k": "v"}}})
    await core.patch_namespaced_pod(
        "a", "ns", [{"op": "add", "path": "/metadata/annotations/j", "value": "w"}]
    )
    pod = await core.read_namespaced_pod("a", "ns")
    assert pod.metadata.annotations == {"k": "v", "j": "w"}


async def test_binding_sets_node_and_annotations_once(
    server: apiserver.ApiServer, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_pod("ns", _pod("a"))
    binding = {"metadata": {"name": "a", "annotations": {"card": "GPU-1"}},
               "target": {"kind": "Node", "name": "n1"}}
    # The generated client cannot parse the Status the real apiserver answers with, so post raw.
    path = f"{server.url}/api/v1/namespaces/ns/pods/a/binding"
    status, _ = await _post(path, binding)
    assert status == 201
    pod = await core.read_namespaced_pod("a", "ns")
    assert pod.spec.node_name == "n1"
    assert pod.metadata.annotations == {"card": "GPU-1"}
    again, body = await _post(path, binding | {"target": {"kind": "Node", "name": "n2"}})
    assert again == 409 and "already assigned" in body["message"]


async def test_watch_resumes_from_a_resource_version(core: client.CoreV1Api) -> None:
    listed = await core.list_namespaced_pod("ns")
    await core.create_namespaced_pod("ns", _pod("a"))
    await core.delete_namespaced_pod("a", "ns")
    seen = []
    stream = watch.Watch()
    async with stream:
        async for event in stream.stream(
            core.list_namespaced_pod, "ns", resource_version=listed.metadata.resource_version,
            timeout_seconds=1,
        ):
            seen.append((event["type"], event["object"].metadata.name))
    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]  # deletionTimestamp first


async def test_watch_from_a_compacted_version_is_gone(
    server: apiserver.ApiServer, core: client.CoreV1Api
) -> None:
    server.store.history.clear()
    await core.create_namespaced_pod("ns", _pod("a"))
    await core.create_namespaced_pod("ns", _pod("b"))
    server.store.history.pop(0)
    stream = watch.Watch()
    with pytest.raises(ApiException) as gone:
        async with stream:
            async for _ in stream.stream(core.list_namespaced_pod, "ns", resource_version="1",
                                         timeout_seconds=1):
                pass
    assert gone.value.status == 410


async def _post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_watch_sees_changes_made_while_it_waits(core: client.CoreV1Api) -> None:
    listed = await core.list_namespaced_pod("ns")
    stream = watch.Watch()

    async def first_event() -> str:
        async with stream:
            async for event in stream.stream(
                core.list_namespaced_pod, "ns", resource_version=listed.metadata.resource_version
            ):
                return str(event["object"].metadata.name)
        return ""

    task = asyncio.create_task(first_event())
    await asyncio.sleep(0.05)
    await core.create_namespaced_pod("ns", _pod("late"))
    assert await asyncio.wait_for(task, 5) == "late"


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=x", True),
        ("app==x,tier", True),
        ("app!=x", False),
        ("!tier", False),
        ("app in (y, x)", True),
        ("app notin (x)", False),
        ("missing", False),
    ],
)
def test_label_selectors_follow_kubernetes_grammar(selector: str, matches: bool) -> None:
    assert selectors.label_matcher(selector)({"app": "x", "tier": "gpu"}) is matches


def test_field_selectors_read_nested_fields() -> None:
    pod = {"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    assert selectors.field_matcher("spec.nodeName=n1,status.phase!=Failed")(pod)
    assert not selectors.field_matcher("spec.nodeName=n2")(pod)


def test_a_strategic_merge_patch_merges_containers_by_name() -> None:
    pod = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]}}
    patch = {"spec": {"containers": [{"name": "b", "image": "3"}]}}
    merged = patches.apply_patch(pod, "application/strategic-merge-patch+json", patch)
    assert merged["spec"]["containers"] == [
        {"name": "a", "image": "1"}, {"name": "b", "image": "3"}
    ]
    plain = patches.apply_patch(pod, "application/merge-patch+json", patch)
    assert plain["spec"]["containers"] == [{"name": "b", "image": "3"}]


def test_an_unknown_patch_type_is_415() -> None:
    with pytest.raises(apiserver.ApiError) as refused:
        patches.apply_patch({}, "application/apply-patch+yaml", {})
    assert refused.value.code == 415
