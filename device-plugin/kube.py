"""The Kubernetes API behind a small interface, so another endpoint (the simulator's) can stand in.

:class:`NodeApi` is everything the agent asks of the API server. :class:`KubeApi` implements it with
kubernetes_asyncio; its errors stop here as :class:`~gpushare.runtime.errors.ApiError`.
:class:`PodCache` keeps this node's pods from a list-and-watch.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.deviceplugin.pods import PodInfo
from gpushare.runtime import connection
from gpushare.runtime.errors import ApiError, Translated

logger = logging.getLogger(__name__)

COMPONENT: Final = "gpushare-device-plugin"
"""The ``source.component`` of the Events the agent posts."""

WATCH_SECONDS: Final = 300
"""A watch is renewed this often, as client-go's reflector does (it picks 5 to 10 minutes)."""

CALL_SECONDS: Final = 10.0
"""Deadline of every API call but the watch: an apiserver answers in milliseconds, and one that
accepts connections and never answers must not hold any of the agent's loops for longer."""

RETRY_SECONDS: Final = (1.0, 2.0, 5.0, 10.0)
"""Backoff after a failed list or watch: quick first, then every 10 s (a restarting apiserver)."""


class NodeApi(Protocol):
    """What the agent asks of the API server."""

    async def patch_node_annotations(
        self, node: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge ``annotations`` into the Node's (``None`` removes one)."""
        ...

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge ``annotations`` into the Pod's."""
        ...

    async def list_pods(self, node: str) -> tuple[list[PodInfo], str]:
        """The pods bound to ``node`` and the list's resourceVersion."""
        ...

    def watch_pods(self, node: str, resource_version: str) -> AsyncIterator[tuple[str, PodInfo]]:
        """Changes to ``node``'s pods after ``resource_version``: (ADDED|MODIFIED|DELETED, pod)."""
        ...

    async def post_event(
        self, pod: PodInfo, *, reason: str, message: str, warning: bool = True, node: str = ""
    ) -> None:
        """Record an Event about ``pod``."""
        ...

    async def evict(self, namespace: str, name: str) -> None:
        """Evict a pod through the Eviction API (PodDisruptionBudgets apply)."""
        ...


class KubeApi:
    """:class:`NodeApi` over kubernetes_asyncio."""

    def __init__(self, api_client: client.ApiClient, *, call_seconds: float = CALL_SECONDS) -> None:
        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._deadline = call_seconds

    @classmethod
    async def connect(
        cls, kubeconfig: Path | None = None, *, call_seconds: float = CALL_SECONDS
    ) -> "KubeApi":
        """From the connection :mod:`gpushare.runtime.connection` finds."""
        return cls(await connection.api_client(kubeconfig), call_seconds=call_seconds)

    @property
    def api_client(self) -> client.ApiClient:
        """The underlying client, shared by the DRA backend's adapter."""
        return self._client

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._client.close()

    async def patch_node_annotations(
        self, node: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge-patch the Node's annotations."""
        body = {"metadata": {"annotations": dict(annotations)}}
        async with Translated(f"patch node {node}"):
            await self._core.patch_node(node, body, _request_timeout=self._deadline)

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge-patch the Pod's annotations."""
        body = {"metadata": {"annotations": dict(annotations)}}
        async with Translated(f"patch pod {namespace}/{name}"):
            await self._core.patch_namespaced_pod(
                name, namespace, body, _request_timeout=self._deadline
            )

    async def list_pods(self, node: str) -> tuple[list[PodInfo], str]:
        """One list of the node's pods (all namespaces)."""
        async with Translated(f"list pods of node {node}"):
            response = await self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}",
                _preload_content=False,
                _request_timeout=self._deadline,
            )
            raw = await asyncio.wait_for(_json(response), self._deadline)
        pods = [PodInfo.from_api(item) for item in raw.get("items") or []]
        return pods, str((raw.get("metadata") or {}).get("resourceVersion") or "")

    async def watch_pods(
        self, node: str, resource_version: str
    ) -> AsyncIterator[tuple[str, PodInfo]]:
        """Stream pod changes; raises :class:`ApiError` (410 when the version is too old)."""
        async with Translated(f"watch pods of node {node}"):
            response: Any = await self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}",
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                # Connecting (and the TLS handshake) within the call deadline; then the stream.
                _request_timeout=aiohttp.ClientTimeout(
                    total=WATCH_SECONDS + 30,
                    connect=self._deadline,
                    sock_connect=self._deadline,
                ),
                _preload_content=False,
            )
            if not 200 <= response.status <= 299:
                await _json(response)
            async with response:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        raise ApiError.from_status(int(obj.get("code") or 500), obj)
                    if kind == "BOOKMARK":
                        continue
                    yield kind, PodInfo.from_api(obj)

    async def post_event(
        self, pod: PodInfo, *, reason: str, message: str, warning: bool = True, node: str = ""
    ) -> None:
        """Create a core/v1 Event on the pod (``kubectl describe pod`` shows it)."""
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{pod.name}.", namespace=pod.namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", namespace=pod.namespace, name=pod.name, uid=pod.uid
            ),
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component=COMPONENT, host=node or None),
            reporting_component=COMPONENT,
            reporting_instance=node,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        async with Translated(f"post event on {pod.key}"):
            await self._core.create_namespaced_event(
                pod.namespace, body, _request_timeout=self._deadline
            )

    async def evict(self, namespace: str, name: str) -> None:
        """POST an Eviction."""
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=namespace))
        async with Translated(f"evict pod {namespace}/{name}"):
            await self._core.create_namespaced_pod_eviction(
                name, namespace, body, _request_timeout=self._deadline
            )


async def _json(response: Any) -> dict[str, Any]:
    """The body of a raw (not preloaded) response, raising for a non-2xx status."""
    async with response:
        body = await response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason)
    data: dict[str, Any] = json.loads(body)
    return data


class PodCache:
    """This node's pods from a list and a watch, relisting on 410 Gone and retrying on errors."""

    def __init__(self, api: NodeApi, node: str) -> None:
        self._api = api
        self._node = node
        self._pods: dict[str, PodInfo] = {}
        self.synced = asyncio.Event()

    def pods(self) -> list[PodInfo]:
        """The pods known now."""
        return list(self._pods.values())

    async def _list(self) -> str:
        """Replace the cache with a fresh list; the list's resourceVersion."""
        pods, version = await self._api.list_pods(self._node)
        self._pods = {pod.key: pod for pod in pods}
        self.synced.set()
        return version

    async def run(self) -> None:
        """List, then watch, forever."""
        failures = 0
        while True:
            try:
                version = await self._list()
                failures = 0
                while True:
                    async for kind, pod in self._api.watch_pods(self._node, version):
                        if kind == "DELETED":
                            self._pods.pop(pod.key, None)
                        else:
                            self._pods[pod.key] = pod
                    # A watch that times out normally is renewed from a fresh list: simple and rare.
                    break
            except ApiError as exc:
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                log = logger.debug if exc.status == 410 else logger.warning
                log("pod watch of node %s: %s; relisting in %.0f s", self._node, exc, delay)
                await asyncio.sleep(0 if exc.status == 410 else delay)
