"""The kubelet DevicePlugin service (v1beta1): gRPC in, the agent's answers out.

Handlers only translate: protobuf to plain values, the agent's errors to gRPC status codes (whose
message kubelet puts in the pod's admission error), and plain values back to protobuf.
"""

import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Final

import grpc
import grpc.aio

from gpushare.core import errors
from gpushare.core.ids import DeviceID
from gpushare.deviceplugin import devices
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.allocation import ContainerSetup
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

logger = logging.getLogger(__name__)

OPTIONS: Final = api_pb2.DevicePluginOptions(
    pre_start_required=True, get_preferred_allocation_available=True
)

_CODES: Final = (
    (errors.BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NoFit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Conflict, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: errors.GpushareError) -> grpc.StatusCode:
    """The gRPC status for one of our errors."""
    return next((code for kind, code in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


class DevicePlugin(api_pb2_grpc.DevicePluginServicer):
    """The servicer kubelet calls."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def GetDevicePluginOptions(  # noqa: N802 - the gRPC method's name
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.DevicePluginOptions:
        """PreStartContainer and GetPreferredAllocation are both offered."""
        return OPTIONS

    async def ListAndWatch(  # noqa: N802
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        """The device list now, then again on every change (health, MPS servers)."""
        agent = self._agent
        sent: list[tuple[DeviceID, bool]] | None = None
        while True:
            async with agent.devices_changed:
                await agent.devices_changed.wait_for(partial(_differs, agent, sent))
                sent = agent.device_list()
            yield api_pb2.ListAndWatchResponse(
                devices=[
                    api_pb2.Device(ID=d, health=devices.HEALTHY if ok else devices.UNHEALTHY)
                    for d, ok in sent
                ]
            )

    async def GetPreferredAllocation(  # noqa: N802
        self,
        request: api_pb2.PreferredAllocationRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.PreferredAllocationResponse:
        """One preference per container: its units on the extender's card; IDs this plugin never
        listed are refused (``INVALID_ARGUMENT``)."""
        responses = []
        for container in request.container_requests:
            try:
                ids = await self._agent.preferred(
                    list(container.available_deviceIDs),
                    list(container.must_include_deviceIDs),
                    container.allocation_size,
                )
            except errors.GpushareError as exc:
                logger.warning("GetPreferredAllocation refused: %s", exc)
                await context.abort(status_of(exc), str(exc))
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(  # noqa: N802
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.AllocateResponse:
        """The contract's environment for each container; any refusal fails the whole call."""
        responses = []
        for container in request.container_requests:
            try:
                setup = await self._agent.allocate(list(container.devices_ids))
            except errors.GpushareError as exc:
                logger.warning("Allocate %s refused: %s", list(container.devices_ids), exc)
                await context.abort(status_of(exc), str(exc))
            responses.append(_response(setup))
        return api_pb2.AllocateResponse(container_responses=responses)

    async def PreStartContainer(  # noqa: N802
        self,
        request: api_pb2.PreStartContainerRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.PreStartContainerResponse:
        """Make sure the container's MPS daemon runs before it starts."""
        try:
            await self._agent.pre_start(list(request.devices_ids))
        except errors.GpushareError as exc:
            logger.warning("PreStartContainer %s refused: %s", list(request.devices_ids), exc)
            await context.abort(status_of(exc), str(exc))
        return api_pb2.PreStartContainerResponse()


def _differs(agent: Agent, sent: list[tuple[DeviceID, bool]] | None) -> bool:
    return agent.device_list() != sent


def _response(setup: ContainerSetup) -> api_pb2.ContainerAllocateResponse:
    return api_pb2.ContainerAllocateResponse(
        envs=dict(setup.envs),
        mounts=[
            api_pb2.Mount(
                container_path=m.container_path, host_path=m.host_path, read_only=m.read_only
            )
            for m in setup.mounts
        ],
        cdi_devices=[api_pb2.CDIDevice(name=name) for name in setup.cdi_devices],
    )
