"""A test kubelet: the device-plugin side of kubelet, speaking the real v1beta1 and PodResources v1
gRPC APIs over unix sockets, as kubelet's device manager does.

- A Registration server on ``<dir>/device-plugins/kubelet.sock``. On ``Register`` it dials the
  plugin's endpoint, asks for its options and follows its ``ListAndWatch`` stream.
- ``admit``: what kubelet does when a pod with the resource is admitted: ``GetPreferredAllocation``
  over the free healthy IDs, then ``Allocate`` (and ``PreStartContainer``), and records the devices
  in its PodResources server on ``<dir>/pod-resources/kubelet.sock``.
- ``admit_batch``: a batch of new pods in kubelet's own order: ``HandlePodAdditions`` sorts them by
  creation time (a stable sort: equal times keep the order received), then each pod's containers
  are admitted in spec order, one ``GetPreferredAllocation``/``Allocate`` per container.
- ``restart``: kubelet restarting: every socket in ``device-plugins`` removed, a new registration
  socket (a new inode), the plugin expected to register again.
"""

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import grpc.aio

from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as dp_grpc
from gpushare.deviceplugin.api.podresources.v1 import api_pb2 as pr
from gpushare.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

Devices = dict[str, str]
"""Device ID to health, as the last ListAndWatch message said."""


@dataclass(frozen=True)
class NewPod:
    """A pod as kubelet's admission sees it: its creation time and its memory containers."""

    namespace: str
    name: str
    created: datetime
    containers: tuple[tuple[str, int], ...]
    """(container name, units), in spec order."""


class _Registration(dp_grpc.RegistrationServicer):
    def __init__(self, kubelet: "TestKubelet") -> None:
        self._kubelet = kubelet

    async def Register(self, request: dp.RegisterRequest, context: object) -> dp.Empty:  # noqa: N802
        self._kubelet.registrations.append(request)
        self._kubelet.follow(request.endpoint)
        return dp.Empty()


class _PodResources(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: "TestKubelet") -> None:
        self._kubelet = kubelet

    async def List(  # noqa: N802
        self, request: pr.ListPodResourcesRequest, context: object
    ) -> pr.ListPodResourcesResponse:
        pods = []
        for (namespace, name), containers in self._kubelet.assigned.items():
            pods.append(
                pr.PodResources(
                    namespace=namespace,
                    name=name,
                    containers=[
                        pr.ContainerResources(
                            name=container,
                            devices=[pr.ContainerDevices(resource_name=resource, device_ids=ids)],
                        )
                        for container, (resource, ids) in containers.items()
                    ],
                )
            )
        return pr.ListPodResourcesResponse(pod_resources=pods)

    async def GetAllocatableResources(  # noqa: N802
        self,
        request: pr.AllocatableResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pr.AllocatableResourcesResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test kubelet")

    async def Get(  # noqa: N802
        self, request: pr.GetPodResourcesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pr.GetPodResourcesResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test kubelet")


class TestKubelet:
    """kubelet's device manager and PodResources server, in this process."""

    __test__ = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plugins_dir = root / "device-plugins"
        self.registrations: list[dp.RegisterRequest] = []
        self.options: dp.DevicePluginOptions | None = None
        self.devices: Devices = {}
        self.lists = 0
        """ListAndWatch messages received."""
        self.assigned: dict[tuple[str, str], dict[str, tuple[str, list[str]]]] = {}
        """(namespace, pod) -> container -> (resource, device IDs): the PodResources answer."""
        self.changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self._pod_resources: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._follower: asyncio.Task[None] | None = None
        self.stub: dp_grpc.DevicePluginAsyncStub | None = None

    @property
    def socket(self) -> Path:
        """kubelet.sock."""
        return self.plugins_dir / "kubelet.sock"

    async def start(self) -> None:
        """Serve registration and PodResources."""
        self.plugins_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "pod-resources").mkdir(parents=True, exist_ok=True)
        self._server = grpc.aio.server()
        dp_grpc.add_RegistrationServicer_to_server(_Registration(self), self._server)
        self._server.add_insecure_port(f"unix://{self.socket}")
        await self._server.start()
        if self._pod_resources is None:
            self._pod_resources = grpc.aio.server()
            pr_grpc.add_PodResourcesListerServicer_to_server(
                _PodResources(self), self._pod_resources
            )
            self._pod_resources.add_insecure_port(
                f"unix://{self.root / 'pod-resources' / 'kubelet.sock'}"
            )
            await self._pod_resources.start()

    async def stop(self) -> None:
        """Stop everything."""
        await self._drop_plugin()
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        if self._pod_resources is not None:
            await self._pod_resources.stop(grace=None)
            self._pod_resources = None

    async def restart(self) -> None:
        """As kubelet restarts: sockets removed, a new kubelet.sock, the plugin forgotten."""
        await self._drop_plugin()
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        for path in self.plugins_dir.iterdir():
            path.unlink()
        self.devices = {}
        await self.start()

    def follow(self, endpoint: str) -> None:
        """Dial the plugin and follow its ListAndWatch (as kubelet does after Register)."""
        if self._follower is not None:
            self._follower.cancel()
        self._follower = asyncio.get_running_loop().create_task(self._follow(endpoint))

    async def _follow(self, endpoint: str) -> None:
        if self._channel is not None:
            await self._channel.close()
        channel = grpc.aio.insecure_channel(f"unix://{self.plugins_dir / endpoint}")
        self._channel = channel
        self.stub = dp_grpc.DevicePluginStub(channel)
        self.options = await self.stub.GetDevicePluginOptions(dp.Empty())
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for message in self.stub.ListAndWatch(dp.Empty()):
                async with self.changed:
                    self.devices = {d.ID: d.health for d in message.devices}
                    self.lists += 1
                    self.changed.notify_all()

    async def _drop_plugin(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.stub = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate`` holds (checked on each ListAndWatch message and every 50 ms)."""

        async def waiting() -> None:
            while not predicate():
                async with self.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 0.05)

        await asyncio.wait_for(waiting(), timeout)

    def free_healthy(self) -> list[str]:
        """Healthy IDs no container holds (kubelet's 'available' set)."""
        held = {i for pod in self.assigned.values() for _, ids in pod.values() for i in ids}
        return [d for d, health in self.devices.items() if health == "Healthy" and d not in held]

    async def admit(
        self,
        namespace: str,
        pod: str,
        container: str,
        units: int,
        *,
        resource: str = "gpushare.io/gpu-memory",
    ) -> dp.ContainerAllocateResponse:
        """Admit one container as kubelet: prefer, allocate, pre-start, record."""
        assert self.stub is not None, "no plugin registered"
        available = self.free_healthy()
        preferred = await self.stub.GetPreferredAllocation(
            dp.PreferredAllocationRequest(
                container_requests=[
                    dp.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available,
                        must_include_deviceIDs=[],
                        allocation_size=units,
                    )
                ]
            )
        )
        chosen = list(preferred.container_responses[0].deviceIDs)
        chosen += [d for d in available if d not in chosen][: units - len(chosen)]
        response = await self.stub.Allocate(
            dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=chosen)])
        )
        await self.stub.PreStartContainer(dp.PreStartContainerRequest(devices_ids=chosen))
        self.assigned.setdefault((namespace, pod), {})[container] = (resource, chosen)
        return response.container_responses[0]

    async def admit_batch(
        self, pods: Sequence[NewPod]
    ) -> dict[tuple[str, str], dp.ContainerAllocateResponse]:
        """Admit pods as ``HandlePodAdditions`` does; answers by (pod name, container name)."""
        answers = {}
        for pod in sorted(pods, key=lambda p: p.created):
            for container, units in pod.containers:
                answers[pod.name, container] = await self.admit(
                    pod.namespace, pod.name, container, units
                )
        return answers

    def release(self, namespace: str, pod: str) -> None:
        """The pod is gone."""
        self.assigned.pop((namespace, pod), None)
