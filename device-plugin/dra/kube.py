"""The resource.k8s.io objects the node side reads and writes, behind a small interface.

kubernetes_asyncio's typed models lag the API's newest fields (consumable capacity), so the
objects travel as plain dicts through its generic client; errors stop here as
:class:`gpushare.runtime.errors.ApiError`. Every call has the agent's API deadline
(:data:`gpushare.deviceplugin.kube.CALL_SECONDS`).
"""

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final, Protocol

from kubernetes_asyncio import client

from gpushare.core import names
from gpushare.deviceplugin import kube
from gpushare.runtime.errors import ApiError, Translated

FIELD_MANAGER: Final = "gpushare-device-plugin"
"""The server-side-apply manager of the slices the agent writes."""

_GROUP, _VERSION = names.DRA_API_VERSION.split("/")


class DraApi(Protocol):
    """What the node side asks of the API server about DRA objects."""

    async def apply_slice(self, body: Mapping[str, Any]) -> None:
        """Create or update a ResourceSlice (server-side apply)."""
        ...

    async def slice_exists(self, name: str) -> bool:
        """Whether a ResourceSlice of that name exists."""
        ...

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """One ResourceClaim as the API returns it."""
        ...

    async def gpu_memory_allocatable(self, node: str) -> int:
        """The node's allocatable ``gpushare.io/gpu-memory`` units (0 when it has none)."""
        ...

    async def node_labels(self, node: str) -> dict[str, str]:
        """The node's labels."""
        ...


class KubeDraApi:
    """:class:`DraApi` over kubernetes_asyncio's generic custom-object client."""

    def __init__(
        self, api_client: client.ApiClient, *, call_seconds: float = kube.CALL_SECONDS
    ) -> None:
        self._objects = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._deadline = call_seconds

    async def apply_slice(self, body: Mapping[str, Any]) -> None:
        """Server-side apply, forced: the agent owns its node's slice."""
        name = body["metadata"]["name"]
        async with Translated(f"apply resourceslice {name}"):
            # The stub lacks ``_content_type``, which the client honours (apply needs its own).
            await self._objects.patch_cluster_custom_object(  # type: ignore[call-arg]
                _GROUP,
                _VERSION,
                "resourceslices",
                name,
                dict(body),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _request_timeout=self._deadline,
            )

    async def slice_exists(self, name: str) -> bool:
        """GET the slice; 404 means no."""
        try:
            async with Translated(f"get resourceslice {name}"):
                await self._objects.get_cluster_custom_object(
                    _GROUP, _VERSION, "resourceslices", name, _request_timeout=self._deadline
                )
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """GET the claim as raw JSON."""
        async with Translated(f"get resourceclaim {namespace}/{name}"):
            response = await self._objects.get_namespaced_custom_object(
                _GROUP,
                _VERSION,
                namespace,
                "resourceclaims",
                name,
                _preload_content=False,
                _request_timeout=self._deadline,
            )
            async with response:
                raw = await asyncio.wait_for(response.read(), self._deadline)
        claim: dict[str, Any] = json.loads(raw)
        return claim

    async def gpu_memory_allocatable(self, node: str) -> int:
        """Read the Node's ``status.allocatable``."""
        async with Translated(f"get node {node}"):
            found = await self._core.read_node(node, _request_timeout=self._deadline)
        allocatable = (found.status.allocatable if found.status else None) or {}
        return int(allocatable.get(names.RESOURCE_GPU_MEMORY) or 0)

    async def node_labels(self, node: str) -> dict[str, str]:
        """Read the Node's labels."""
        async with Translated(f"get node {node}"):
            found = await self._core.read_node(node, _request_timeout=self._deadline)
        return dict((found.metadata.labels if found.metadata else None) or {})
