"""The API behaviours the parts rely on, asked of both API servers a simulation can run on.

The same requests, over the same REST client, against the embedded API server of
``gpushare simulate`` and against the real kube-apiserver (``cluster``): create and read, the
errors a part reacts to (409 AlreadyExists and Conflict, 404 NotFound), label and field selectors
(the device plugin lists its node's pods by ``spec.nodeName``), merge patches of annotations (the
node report), the Binding subresource with annotations (the extender's bind), the status
subresource (kubelet's phase), resourceVersion checks, watches that resume from a
resourceVersion (every reflector), and ``events.k8s.io/v1`` Events. Where the embedded server
answers differently, it is wrong: it is cut down to what passes here.
"""

import asyncio
import contextlib
import json
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from gpushare.simulator import apiserver
from gpushare.simulator.controlplane.rest import ApiError, Rest
from tests import cluster


@dataclass(frozen=True)
class Server:
    rest: Rest
    namespace: str


@contextlib.contextmanager
def _embedded() -> Iterator[Rest]:
    """The embedded API server on its own event loop, in a thread, as a simulation runs it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = apiserver.ApiServer()
    try:
        url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield Rest(url, ssl.create_default_context())
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(
    params=["embedded", pytest.param("real", marks=pytest.mark.cluster)], scope="module"
)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    namespace = cluster.unique_name("conformance")
    if request.param == "embedded":
        with _embedded() as rest:
            rest.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
            yield Server(rest, namespace)
        return
    plane: cluster.ControlPlane = request.getfixturevalue("control_plane")
    cluster.create_namespace(plane, namespace)
    yield Server(plane.rest(), namespace)
    cluster.cleanup_namespace(plane, namespace)


def _pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }


def _pods(server: Server, name: str = "") -> str:
    return f"/api/v1/namespaces/{server.namespace}/pods" + (f"/{name}" if name else "")


def _watch(server: Server, path: str, resource_version: str, seconds: int = 2) -> list[Any]:
    """The events a watch from ``resource_version`` delivers within ``seconds``."""
    query = urllib.parse.urlencode(
        {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": str(seconds)}
    )
    request = urllib.request.Request(f"{server.rest.base_url}{path}?{query}")
    with urllib.request.urlopen(request, context=server.rest.context, timeout=seconds + 5) as body:
        return [json.loads(line) for line in body if line.strip()]


def test_a_created_object_reads_back_and_a_second_create_is_already_exists(
    server: Server,
) -> None:
    created = server.rest.create(_pods(server), _pod("first"))
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert server.rest.get(_pods(server, "first"))["metadata"]["uid"] == meta["uid"]
    with pytest.raises(ApiError) as again:
        server.rest.create(_pods(server), _pod("first"))
    assert (again.value.status, again.value.reason) == (409, "AlreadyExists")
    with pytest.raises(ApiError) as missing:
        server.rest.get(_pods(server, "never-made"))
    assert (missing.value.status, missing.value.reason) == (404, "NotFound")


def test_lists_select_by_label_and_by_node_name(server: Server) -> None:
    for name, app in (("sel-a", "x"), ("sel-b", "y")):
        server.rest.create(_pods(server), _pod(name, {"app": app, "suite": "select"}))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "sel-a"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-sel"},
    }
    server.rest.create(_pods(server, "sel-a") + "/binding", binding)

    def names(**params: str) -> list[str]:
        listed = server.rest.get(_pods(server), **params)
        return sorted(item["metadata"]["name"] for item in listed["items"])

    assert names(labelSelector="suite=select,app=y") == ["sel-b"]
    assert names(labelSelector="suite=select,app!=y") == ["sel-a"]
    assert names(labelSelector="suite=select", fieldSelector="spec.nodeName=node-sel") == ["sel-a"]
    assert names(labelSelector="suite=select", fieldSelector="spec.nodeName=") == ["sel-b"]


def test_a_merge_patch_sets_and_removes_annotations(server: Server) -> None:
    name = cluster.unique_name("node-patch")
    server.rest.create(
        "/api/v1/nodes",
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "annotations": {"a": "1"}}},
    )
    try:
        patched = server.rest.patch(
            f"/api/v1/nodes/{name}", {"metadata": {"annotations": {"a": None, "b": "2"}}}
        )
        assert patched["metadata"]["annotations"] == {"b": "2"}
    finally:
        server.rest.delete(f"/api/v1/nodes/{name}")


def test_a_binding_sets_the_node_and_its_annotations_once(server: Server) -> None:
    created = server.rest.create(_pods(server), _pod("bound"))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {
            "name": "bound",
            "uid": created["metadata"]["uid"],
            "annotations": {"gpushare.io/card-uuid": "GPU-1"},
        },
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
    }
    server.rest.create(_pods(server, "bound") + "/binding", binding)
    pod = server.rest.get(_pods(server, "bound"))
    assert pod["spec"]["nodeName"] == "node-1"
    assert pod["metadata"]["annotations"]["gpushare.io/card-uuid"] == "GPU-1"
    with pytest.raises(ApiError) as again:
        server.rest.create(_pods(server, "bound") + "/binding", binding)
    assert again.value.status == 409


def test_a_write_with_a_stale_resource_version_is_a_conflict(server: Server) -> None:
    created = server.rest.create(_pods(server), _pod("stale"))
    server.rest.patch(_pods(server, "stale"), {"metadata": {"labels": {"moved": "on"}}})
    stale = {**created, "metadata": {**created["metadata"], "labels": {"old": "write"}}}
    with pytest.raises(ApiError) as conflict:
        server.rest.replace(_pods(server, "stale"), stale)
    assert (conflict.value.status, conflict.value.reason) == (409, "Conflict")


def test_the_status_subresource_changes_the_status(server: Server) -> None:
    server.rest.create(_pods(server), _pod("phase"))
    server.rest.patch(_pods(server, "phase") + "/status", {"status": {"phase": "Running"}})
    assert server.rest.get(_pods(server, "phase"))["status"]["phase"] == "Running"


def test_a_watch_resumes_after_a_resource_version_and_sees_each_change_in_order(
    server: Server,
) -> None:
    created = server.rest.create(_pods(server), _pod("watched", {"suite": "watch"}))
    server.rest.patch(_pods(server, "watched"), {"metadata": {"labels": {"step": "two"}}})
    server.rest.delete(_pods(server, "watched"), gracePeriodSeconds=0)
    events = [
        e
        for e in _watch(server, _pods(server), created["metadata"]["resourceVersion"])
        if e["object"]["metadata"]["name"] == "watched"
    ]
    # A deletion shows the pod's deletionTimestamp first, even with a grace period of 0.
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["labels"]["step"] == "two"
    assert "deletionTimestamp" in events[1]["object"]["metadata"]
    with pytest.raises(ApiError) as gone:
        server.rest.get(_pods(server, "watched"))
    assert gone.value.status == 404


def test_an_events_k8s_io_event_is_accepted(server: Server) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": cluster.unique_name("ev"), "namespace": server.namespace},
        "eventTime": now,
        "reportingController": "gpushare.io/scheduler",
        "reportingInstance": "gpushare-scheduler-0",
        "action": "Binding",
        "reason": "Scheduled",
        "type": "Normal",
        "note": "bound to a card",
        "regarding": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": server.namespace,
            "name": "some-pod",
        },
    }
    path = f"/apis/events.k8s.io/v1/namespaces/{server.namespace}/events"
    created = server.rest.create(path, event)
    assert created["note"] == "bound to a card"
