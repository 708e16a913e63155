"""kubelet's device-manager side, for one simulated node: registration, ListAndWatch, allocation.

It serves ``Registration`` on ``<kubelet_dir>/device-plugins/kubelet.sock`` and kubelet's
``PodResources`` v1 API on ``<kubelet_dir>/pod-resources/kubelet.sock``; when the plugin registers
it dials the plugin's socket, reads its options and follows its ``ListAndWatch`` stream. For a
container that requests the resource it does what kubelet's device manager does: take the healthy
IDs no live container holds, ask ``GetPreferredAllocation`` for ``size`` of them, complete the
answer from the rest if it falls short, call ``Allocate`` (and ``PreStartContainer`` where the
plugin asks for it), and remember which container holds which IDs. New pods are admitted in
kubelet's own order (:meth:`Kubelet.admit_batch`: ``HandlePodAdditions`` sorts them by creation
time, then each pod's containers in spec order), and a kubelet restart removes every socket and
makes the plugin register again (:meth:`Kubelet.restart`).

This is the one kubelet stand-in of the tree: the simulation, the benchmarks and the device
plugin's tests all drive the plugin through it.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
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
    response: api_pb2.ContainerAllocateResponse
    """The answer as it came over the wire."""


@dataclass(frozen=True, slots=True)
class NewPod:
    """A pod as kubelet's admission sees it: its creation time and its memory containers."""

    namespace: str
    name: str
    created: datetime
    containers: tuple[tuple[str, int], ...]
    """(container name, units), in spec order."""


@dataclass(slots=True)
class _Holding:
    namespace: str
    name: str
    container: str
    devices: tuple[str, ...]


class Kubelet:
    """The device manager of one node."""

    def __init__(self, node: str, kubelet_dir: Path, resource: str) -> None:
        self.node = node
        self.kubelet_dir = kubelet_dir
        self.resource = resource
        self.devices: dict[str, str] = {}
        """Every ID the plugin lists, and its health (``Healthy``, ``Unhealthy``)."""
        self.holdings: dict[PodKey, list[_Holding]] = {}
        self.registrations: list[api_pb2.RegisterRequest] = []
        """Every registration received, in order."""
        self.listed = asyncio.Event()
        """Set once the first ``ListAndWatch`` answer arrived."""
        self.lists = 0
        """``ListAndWatch`` answers received."""
        self.changed = asyncio.Condition()
        """Notified on each ``ListAndWatch`` answer."""
        self.options: api_pb2.DevicePluginOptions | None = None
        self.stopping = False
        self._registration: grpc.aio.Server | None = None
        self._podresources: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: api_pb2_grpc.DevicePluginAsyncStub | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def plugin_folder(self) -> Path:
        return self.kubelet_dir / "device-plugins"

    @property
    def socket(self) -> Path:
        """kubelet's registration socket."""
        return self.plugin_folder / "kubelet.sock"

    @property
    def stub(self) -> "api_pb2_grpc.DevicePluginAsyncStub | None":
        """The registered plugin's stub, to call it as kubelet would."""
        return self._stub

    async def start(self) -> None:
        """Serve Registration and PodResources on their sockets."""
        self.stopping = False
        self.plugin_folder.mkdir(parents=True, exist_ok=True)
        (self.kubelet_dir / "pod-resources").mkdir(parents=True, exist_ok=True)
        registration = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), registration)
        registration.add_insecure_port(f"unix://{self.socket}")
        await registration.start()
        self._registration = registration
        if self._podresources is None:
            podresources = grpc.aio.server()
            pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), podresources)
            podresources.add_insecure_port(
                f"unix://{self.kubelet_dir / 'pod-resources/kubelet.sock'}"
            )
            await podresources.start()
            self._podresources = podresources

    async def stop(self) -> None:
        self.stopping = True
        await self._drop_plugin()
        for server in (self._registration, self._podresources):
            if server is not None:
                await server.stop(grace=None)
        self._registration = self._podresources = None

    async def restart(self) -> None:
        """As kubelet restarts: every socket removed, a new registration socket (a new inode),
        the plugin forgotten until it registers again; the pods keep their devices."""
        self.stopping = True
        await self._drop_plugin()
        if self._registration is not None:
            await self._registration.stop(grace=None)
            self._registration = None
        for path in self.plugin_folder.iterdir():
            path.unlink()
        self.devices = {}
        self.listed.clear()
        await self.start()

    async def _drop_plugin(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._watch
            self._watch = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._stub = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate`` holds (checked on each ListAndWatch answer and every 50 ms)."""

        async def waiting() -> None:
            while not predicate():
                async with self.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 0.05)

        await asyncio.wait_for(waiting(), timeout)

    async def connect(self, endpoint: str, resource: str) -> None:
        """Dial the plugin that registered, read its options and follow its device list."""
        if resource != self.resource:
            raise errors.BadRequest(f"plugin registered {resource!r}, expected {self.resource!r}")
        await self._drop_plugin()
        self.stopping = False
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
                async with self.changed:
                    self.devices = {d.ID: d.health for d in answer.devices}
                    self.lists += 1
                    self.listed.set()
                    self.changed.notify_all()
        except grpc.aio.AioRpcError as exc:
            if not self.stopping and exc.code() != grpc.StatusCode.CANCELLED:
                logger.warning("node %s: ListAndWatch ended: %s", self.node, exc.details())

    @property
    def allocatable(self) -> int:
        """Healthy IDs: the node's allocatable count of the resource."""
        return sum(1 for health in self.devices.values() if health == HEALTHY)

    def free_devices(self) -> list[str]:
        """Healthy IDs no container holds (kubelet's available set)."""
        held = self.held()
        return [d for d, health in self.devices.items() if health == HEALTHY and d not in held]

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
                            available_deviceIDs=available,
                            must_include_deviceIDs=[],
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
            response=response,
        )

    async def admit_batch(self, pods: Sequence[NewPod]) -> dict[tuple[str, str], Allocated]:
        """Admit new pods as ``HandlePodAdditions`` does: by creation time (a stable sort: equal
        times keep the order received), each pod's containers in spec order; answers by
        (pod name, container name)."""
        answers = {}
        for pod in sorted(pods, key=lambda p: p.created):
            for container, units in pod.containers:
                key = pod_key(pod.namespace, pod.name)
                answers[pod.name, container] = await self.allocate(key, container, units)
        return answers

    def hold(self, pod: PodKey, container: str, devices: Sequence[str]) -> None:
        """Record that ``container`` holds ``devices``, as kubelet's checkpoint would after a
        restart (no ``Allocate`` is called)."""
        namespace, _, name = pod.partition("/")
        holding = _Holding(namespace, name, container, tuple(devices))
        self.holdings.setdefault(pod, []).append(holding)

    def held(self) -> set[str]:
        """Every ID a container holds."""
        return {d for holdings in self.holdings.values() for h in holdings for d in h.devices}

    def release(self, pod: PodKey) -> None:
        """The pod is gone: its containers' IDs are free again."""
        self.holdings.pop(pod, None)


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self._kubelet = kubelet

    async def Register(  # noqa: N802 - the gRPC method's name
        self, request: api_pb2.RegisterRequest, context: "Context"
    ) -> api_pb2.Empty:
        self._kubelet.registrations.append(request)
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
        healthy = [d for d, health in self._kubelet.devices.items() if health == HEALTHY]
        return pr_pb2.AllocatableResourcesResponse(
            devices=[
                pr_pb2.ContainerDevices(resource_name=self._kubelet.resource, device_ids=healthy)
            ]
        )
