"""kubelet's DRA side, for one simulated node: its plugin watcher and DRA manager over unix sockets.

As kubelet does: find ``<driver>-reg.sock`` in ``<dir>/plugins_registry``, ask ``GetInfo``, check
the type and that ``v1.DRAPlugin`` is offered, dial the endpoint it names, report the outcome with
``NotifyRegistrationStatus``; then ``NodePrepareResources``/``NodeUnprepareResources`` per claim.
"""

import asyncio
from pathlib import Path

import grpc
import grpc.aio

from gpushare.core import names
from gpushare.deviceplugin.api.dra.v1 import api_pb2 as dra_pb
from gpushare.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_grpc
from gpushare.deviceplugin.api.pluginregistration.v1 import api_pb2 as reg_pb
from gpushare.deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc


class DraKubelet:
    """The DRA side of kubelet, for one driver."""

    def __init__(self, root: Path) -> None:
        self.registration_socket = root / "plugins_registry" / f"{names.DRA_DRIVER}-reg.sock"
        self.info: reg_pb.PluginInfo | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._stub: dra_grpc.DRAPluginAsyncStub | None = None

    async def register(self, timeout: float = 10.0) -> reg_pb.PluginInfo:
        """Wait for the registration socket, then register the plugin as kubelet does."""
        async with asyncio.timeout(timeout):
            while not self.registration_socket.exists():
                await asyncio.sleep(0.05)
        registration = self._channel(f"unix://{self.registration_socket}")
        stub = reg_grpc.RegistrationStub(registration)
        info: reg_pb.PluginInfo = await stub.GetInfo(reg_pb.InfoRequest(), timeout=timeout)
        ok = info.type == "DRAPlugin" and "v1.DRAPlugin" in info.supported_versions
        await stub.NotifyRegistrationStatus(
            reg_pb.RegistrationStatus(
                plugin_registered=ok, error="" if ok else "unsupported plugin"
            ),
            timeout=timeout,
        )
        assert ok, info
        self._stub = dra_grpc.DRAPluginStub(self._channel(f"unix://{info.endpoint}"))
        self.info = info
        return info

    async def prepare(
        self, namespace: str, name: str, uid: str
    ) -> dra_pb.NodePrepareResourceResponse:
        """NodePrepareResources for one claim; its answer."""
        assert self._stub is not None, "not registered"
        claim = dra_pb.Claim(namespace=namespace, name=name, uid=uid)
        response = await self._stub.NodePrepareResources(
            dra_pb.NodePrepareResourcesRequest(claims=[claim]), timeout=10
        )
        answer: dra_pb.NodePrepareResourceResponse = response.claims[uid]
        return answer

    async def unprepare(self, namespace: str, name: str, uid: str) -> str:
        """NodeUnprepareResources for one claim; its error ('' when fine)."""
        assert self._stub is not None, "not registered"
        claim = dra_pb.Claim(namespace=namespace, name=name, uid=uid)
        response = await self._stub.NodeUnprepareResources(
            dra_pb.NodeUnprepareResourcesRequest(claims=[claim]), timeout=10
        )
        return str(response.claims[uid].error)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(target)
        self._channels.append(channel)
        return channel
