"""Serving the plugin on its socket and registering it with kubelet, again after kubelet restarts.

kubelet's device manager removes every socket in ``<kubelet_dir>/device-plugins`` when it starts and
recreates its own ``kubelet.sock``. The plugin watches that socket's identity (device, inode, change
time) and its own socket; when either changes it serves afresh and registers again, within
:data:`WATCH_SECONDS` plus one registration call.
"""

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final

import grpc
import grpc.aio

from gpushare.core import names
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from gpushare.deviceplugin.server import OPTIONS, DevicePlugin

logger = logging.getLogger(__name__)

API_VERSION: Final = "v1beta1"
KUBELET_SOCKET: Final = "kubelet.sock"
ENDPOINT: Final = "gpushare.sock"
"""Our socket's name in the device-plugins folder (kubelet dials it by name)."""
WATCH_SECONDS: Final = 0.5
"""How often the sockets are checked: re-registration well within the 5 s kubelet tolerates."""
REGISTER_SECONDS: Final = 5.0
"""Timeout of one Register call; kubelet answers at once when it is up."""
RETRY_SECONDS: Final = 1.0


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


class PluginServer:
    """Runs the DevicePlugin gRPC server and keeps it registered."""

    def __init__(self, agent: Agent, *, kubelet_dir: Path, endpoint: str = ENDPOINT) -> None:
        self._agent = agent
        self._folder = kubelet_dir / "device-plugins"
        self._endpoint = endpoint
        self._server: grpc.aio.Server | None = None
        self.registered = asyncio.Event()

    @property
    def socket(self) -> Path:
        """Our socket."""
        return self._folder / self._endpoint

    @property
    def kubelet_socket(self) -> Path:
        """kubelet's registration socket."""
        return self._folder / KUBELET_SOCKET

    async def serve(self) -> None:
        """(Re)start the gRPC server on our socket."""
        await self.stop()
        self._folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(DevicePlugin(self._agent), server)
        server.add_insecure_port(f"unix://{self.socket}")
        await server.start()
        self._server = server
        logger.info("device plugin serving on %s", self.socket)

    async def stop(self) -> None:
        """Stop serving (open ListAndWatch streams end)."""
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        self._set_registered(False)

    async def register(self) -> None:
        """One Register call; raises grpc.aio.AioRpcError when kubelet refuses or is away."""
        async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            await stub.Register(
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=self._endpoint,
                    resource_name=names.RESOURCE_GPU_MEMORY,
                    options=OPTIONS,
                ),
                timeout=REGISTER_SECONDS,
            )
        self._set_registered(True)
        self._agent.metrics.registrations.inc()
        logger.info(
            "registered %s with kubelet at %s", names.RESOURCE_GPU_MEMORY, self.kubelet_socket
        )

    def _set_registered(self, value: bool) -> None:
        self._agent.metrics.registered.set(1 if value else 0)
        if value:
            self.registered.set()
        else:
            self.registered.clear()

    async def run(self) -> None:
        """Serve and register; do both again whenever kubelet's socket or ours changes."""
        try:
            while True:
                kubelet = await self._wait_for_kubelet()
                await self.serve()
                ours = _identity(self.socket)
                if not await self._register_until(kubelet):
                    continue
                while _identity(self.kubelet_socket) == kubelet and _identity(self.socket) == ours:
                    await asyncio.sleep(WATCH_SECONDS)
                logger.warning("kubelet restarted (its socket changed): registering again")
        finally:
            await self.stop()

    async def _wait_for_kubelet(self) -> tuple[int, int, int]:
        while (identity := _identity(self.kubelet_socket)) is None:
            await asyncio.sleep(WATCH_SECONDS)
        return identity

    async def _register_until(self, kubelet: tuple[int, int, int]) -> bool:
        """Register, retrying while the same kubelet is there; ``False`` if it changed meanwhile."""
        while _identity(self.kubelet_socket) == kubelet:
            try:
                await self.register()
                return True
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "registration with kubelet failed: %s %s", exc.code().name, exc.details()
                )
            await asyncio.sleep(RETRY_SECONDS)
        return False
