"""The Kubernetes API behind a small interface, so another endpoint (the simulator's) can stand in.

:class:`NodeApi` is everything the agent asks of the API server. :class:`KubeApi` implements it with
kubernetes_asyncio; its errors stop here as :class:`~gpushare.runtime.errors.ApiError`.
:class:`PodCache` keeps this node's pods from a list-and-watch.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.core import names
from gpushare.deviceplugin.pods import PodInfo
from gpushare.runtime import connection, events, reflector
from gpushare.runtime.errors import ApiError, Translated

logger = logging.getLogger(__name__)

CALL_SECONDS: Final = 10.0
"""Deadline of every API call but the watch: an apiserver answers in milliseconds, and one that
accepts connections and never answers must not hold any of the agent's loops for longer."""


class PodEvent(NamedTuple):
    """One event of a pod watch: ``ADDED``, ``MODIFIED``, ``DELETED`` (with the pod) or
    ``BOOKMARK`` (no pod); the resource version it brings."""

    kind: str
    pod: PodInfo | None
    version: str


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

    def watch_pods(
        self, node: str, resource_version: str, seconds: int
    ) -> AsyncIterator[PodEvent]:
        """Changes to ``node``'s pods after ``resource_version``, for about ``seconds``."""
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
        self._events = client.EventsV1Api(api_client)
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
        self, node: str, resource_version: str, seconds: int
    ) -> AsyncIterator[PodEvent]:
        """Stream pod changes; raises :class:`ApiError` (410 when the version is too old)."""
        async with Translated(f"watch pods of node {node}"):
            response: Any = await self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}",
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=seconds,
                # Connecting (and the TLS handshake) within the call deadline; then the stream.
                _request_timeout=aiohttp.ClientTimeout(
                    total=seconds + 30,
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
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if kind == "BOOKMARK":
                        yield PodEvent(kind, None, version)
                    else:
                        yield PodEvent(kind, PodInfo.from_api(obj), version)

    async def post_event(
        self, pod: PodInfo, *, reason: str, message: str, warning: bool = True, node: str = ""
    ) -> None:
        """Create an Event on the pod (``kubectl describe pod`` shows it)."""
        body = events.event(
            regarding=events.pod_reference(pod.namespace, pod.name, pod.uid),
            reason=reason,
            note=message,
            action=reason,
            controller=names.DEVICE_PLUGIN_CONTROLLER,
            instance=node,
            kind="Warning" if warning else "Normal",
        )
        async with Translated(f"post event on {pod.key}"):
            # The client sends a dict body as it is; its stub names only the generated class.
            await self._events.create_namespaced_event(
                pod.namespace,
                body,  # type: ignore[arg-type]
                _request_timeout=self._deadline,
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
    """This node's pods from a list and a watch (:class:`~gpushare.runtime.reflector.Reflector`:
    resumed from the last version, listed again on 410, jittered backoff on errors)."""

    def __init__(self, api: NodeApi, node: str) -> None:
        self._api = api
        self._node = node
        self._pods: dict[str, PodInfo] = {}
        self._reflector = reflector.Reflector(f"pods of node {node}", self._list, self._watch)
        self.synced = self._reflector.synced

    def pods(self) -> list[PodInfo]:
        """The pods known now."""
        return list(self._pods.values())

    async def _list(self) -> str:
        """Replace the cache with a fresh list; the list's resourceVersion."""
        pods, version = await self._api.list_pods(self._node)
        self._pods = {pod.key: pod for pod in pods}
        return version

    async def _watch(self, version: str, seconds: int) -> str:
        async for event in self._api.watch_pods(self._node, version, seconds):
            if event.pod is not None:
                if event.kind == "DELETED":
                    self._pods.pop(event.pod.key, None)
                else:
                    self._pods[event.pod.key] = event.pod
            version = event.version or version
        return version

    async def run(self) -> None:
        """List, then watch, until cancelled."""
        await self._reflector.run()
