"""kubelet's device-manager side, for one simulated node: registration, ListAndWatch, allocation.

It serves ``Registration`` on ``<kubelet_dir>/device-plugins/kubelet.sock`` and kubelet's
``PodResources`` v1 API on ``<kubelet_dir>/pod-resources/kubelet.sock``; when the plugin registers
it dials the plugin's socket, reads its options and follows its ``ListAndWatch`` stream. For a
container that requests the resource it does what kubelet's device manager does: take the healthy
IDs no live container holds, ask ``GetPreferredAllocation`` for ``size`` of them, complete the
answer from the rest if it falls short, call ``Allocate`` (and ``PreStartContainer`` where the
plugin asks for it), and remember which container holds which IDs.
"""

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import grpc.aio

from gpushare.core import errors
from gpushare.core.ids import PodKey, pod_key
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from gpushare.deviceplugin.api.podresources.v1 import api_pb2 as pr_pb2
from gpushare.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

logger = logging.getLogger(__name__)

API_VERSION: Final = "v1beta1"
HEALTHY: Final = "Healthy"
CALL_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class Allocated:
    """One container's devices and what ``Allocate`` answered for it."""

    devices: tuple[str, ...]
    envs: Mapping[str, str]
    mounts: tuple[tuple[str, str], ...]
    cdi_devices: tuple[str, ...]


@dataclass(slots=True)
class _Holding:
    namespace: str
    name: str
    container: str
    devices: tuple[str, ...]


@dataclass(slots=True)
class Kubelet:
    """The device manager of one node."""

    node: str
    kubelet_dir: Path
    resource: str
    devices: dict[str, bool] = field(default_factory=dict)
    """Every ID the plugin lists, and whether it is healthy."""
    holdings: dict[PodKey, list[_Holding]] = field(default_factory=dict)
    listed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first ``ListAndWatch`` answer arrived."""
    options: api_pb2.DevicePluginOptions | None = None
    stopping: bool = False
    _servers: list[grpc.aio.Server] = field(default_factory=list)
    _channel: grpc.aio.Channel | None = None
    _stub: "api_pb2_grpc.DevicePluginAsyncStub | None" = None
    _watch: asyncio.Task[None] | None = None

    @property
    def plugin_folder(self) -> Path:
        return self.kubelet_dir / "device-plugins"

    async def start(self) -> None:
        """Serve Registration and PodResources on their sockets."""
        self.plugin_folder.mkdir(parents=True, exist_ok=True)
        (self.kubelet_dir / "pod-resources").mkdir(parents=True, exist_ok=True)
        registration = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), registration)
        registration.add_insecure_port(f"unix://{self.plugin_folder / 'kubelet.sock'}")
        podresources = grpc.aio.server()
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), podresources)
        podresources.add_insecure_port(f"unix://{self.kubelet_dir / 'pod-resources/kubelet.sock'}")
        for server in (registration, podresources):
            await server.start()
            self._servers.append(server)

    async def stop(self) -> None:
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._watch
        if self._channel is not None:
            await self._channel.close()
        for server in self._servers:
            await server.stop(grace=None)

    async def connect(self, endpoint: str, resource: str) -> None:
        """Dial the plugin that registered, read its options and follow its device list."""
        if resource != self.resource:
            raise errors.BadRequest(f"plugin registered {resource!r}, expected {self.resource!r}")
        if self._watch is not None:
            self._watch.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._channel = grpc.aio.insecure_channel(f"unix://{self.plugin_folder / endpoint}")
        self._stub = api_pb2_grpc.DevicePluginStub(self._channel)
        self.options = await self._stub.GetDevicePluginOptions(
            api_pb2.Empty(), timeout=CALL_SECONDS
        )
        self._watch = asyncio.create_task(
            self._follow(self._stub), name=f"{self.node} ListAndWatch"
        )

    async def _follow(self, stub: "api_pb2_grpc.DevicePluginAsyncStub") -> None:
        try:
            async for answer in stub.ListAndWatch(api_pb2.Empty()):
                self.devices = {d.ID: d.health == HEALTHY for d in answer.devices}
                self.listed.set()
        except grpc.aio.AioRpcError as exc:
            if not self.stopping and exc.code() != grpc.StatusCode.CANCELLED:
                logger.warning("node %s: ListAndWatch ended: %s", self.node, exc.details())

    @property
    def allocatable(self) -> int:
        """Healthy IDs: the node's allocatable count of the resource."""
        return sum(1 for healthy in self.devices.values() if healthy)

    def free_devices(self) -> list[str]:
        held = {d for holdings in self.holdings.values() for h in holdings for d in h.devices}
        return [d for d, healthy in self.devices.items() if healthy and d not in held]

    async def allocate(self, pod: PodKey, container: str, size: int) -> Allocated:
        """kubelet's device allocation for one container; NoFit when the node lacks IDs."""
        if self._stub is None:
            raise errors.Conflict(
                f"node {self.node}: no device plugin registered for {self.resource}"
            )
        available = self.free_devices()
        if len(available) < size:
            raise errors.NoFit(
                f"Allocate failed due to requested number of devices unavailable for"
                f" {self.resource}. Requested: {size}, Available: {len(available)}"
            )
        chosen: list[str] = []
        if self.options is not None and self.options.get_preferred_allocation_available:
            preferred = await self._stub.GetPreferredAllocation(
                api_pb2.PreferredAllocationRequest(
                    container_requests=[
                        api_pb2.ContainerPreferredAllocationRequest(
                            available_deviceIDs=available, must_include_deviceIDs=[],
                            allocation_size=size,
                        )
                    ]
                ),
                timeout=CALL_SECONDS,
            )
            offered = set(available)
            for offer in preferred.container_responses:
                chosen = [d for d in offer.deviceIDs if d in offered][:size]
        rest = [d for d in available if d not in set(chosen)]
        chosen += rest[: size - len(chosen)]
        try:
            answer = await self._stub.Allocate(
                api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]
                ),
                timeout=CALL_SECONDS,
            )
            if self.options is not None and self.options.pre_start_required:
                await self._stub.PreStartContainer(
                    api_pb2.PreStartContainerRequest(devices_ids=chosen), timeout=CALL_SECONDS
                )
        except grpc.aio.AioRpcError as exc:
            raise errors.Conflict(
                f"device plugin refused: {exc.code().name}: {exc.details()}"
            ) from exc
        response = answer.container_responses[0]
        namespace, _, name = pod.partition("/")
        holding = _Holding(namespace, name, container, tuple(chosen))
        self.holdings.setdefault(pod, []).append(holding)
        return Allocated(
            devices=tuple(chosen),
            envs=dict(response.envs),
            mounts=tuple((m.container_path, m.host_path) for m in response.mounts),
            cdi_devices=tuple(d.name for d in response.cdi_devices),
        )

    def release(self, pod: PodKey) -> None:
        """The pod is gone: its containers' IDs are free again."""
        self.holdings.pop(pod, None)


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self._kubelet = kubelet

    async def Register(  # noqa: N802 - the gRPC method's name
        self, request: api_pb2.RegisterRequest, context: "Context"
    ) -> api_pb2.Empty:
        if request.version != API_VERSION:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unsupported API version {request.version}"
            )
        try:
            await self._kubelet.connect(request.endpoint, request.resource_name)
        except errors.BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.aio.AioRpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach the plugin: {exc}")
        return api_pb2.Empty()


Context = grpc.aio.ServicerContext[object, object]


class _PodResources(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self._kubelet = kubelet

    def _pod(self, holdings: list[_Holding]) -> pr_pb2.PodResources:
        return pr_pb2.PodResources(
            name=holdings[0].name,
            namespace=holdings[0].namespace,
            containers=[
                pr_pb2.ContainerResources(
                    name=h.container,
                    devices=[
                        pr_pb2.ContainerDevices(
                            resource_name=self._kubelet.resource, device_ids=h.devices
                        )
                    ],
                )
                for h in holdings
            ],
        )

    async def List(  # noqa: N802 - the gRPC method's name
        self, request: pr_pb2.ListPodResourcesRequest, context: Context
    ) -> pr_pb2.ListPodResourcesResponse:
        pods = [self._pod(holdings) for holdings in self._kubelet.holdings.values()]
        return pr_pb2.ListPodResourcesResponse(pod_resources=pods)

    async def Get(  # noqa: N802
        self, request: pr_pb2.GetPodResourcesRequest, context: Context
    ) -> pr_pb2.GetPodResourcesResponse:
        holdings = self._kubelet.holdings.get(pod_key(request.pod_namespace, request.pod_name))
        if not holdings:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_name} not found")
        return pr_pb2.GetPodResourcesResponse(pod_resources=self._pod(holdings or []))

    async def GetAllocatableResources(  # noqa: N802
        self, request: pr_pb2.AllocatableResourcesRequest, context: Context
    ) -> pr_pb2.AllocatableResourcesResponse:
        healthy = [d for d, ok in self._kubelet.devices.items() if ok]
        return pr_pb2.AllocatableResourcesResponse(
            devices=[
                pr_pb2.ContainerDevices(resource_name=self._kubelet.resource, device_ids=healthy)
            ]
        )
