"""The kubelet DRA service (``v1.DRAPlugin``) and plugin registration, over unix sockets.

kubelet's plugin watcher finds ``<driver>-reg.sock`` in ``<kubelet_dir>/plugins_registry``, asks
it ``GetInfo`` (type ``DRAPlugin``, our driver name, the service socket, the versions), then calls
``NodePrepareResources``/``NodeUnprepareResources`` on ``<kubelet_dir>/plugins/<driver>/dra.sock``.
Handlers only translate; a claim that cannot be prepared gets its error in the answer (kubelet
reports it on the pod) while the other claims of the call go on.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc
import grpc.aio

from gpushare.core import errors, names
from gpushare.deviceplugin.api.dra.v1 import api_pb2, api_pb2_grpc
from gpushare.deviceplugin.api.pluginregistration.v1 import api_pb2 as reg_pb2
from gpushare.deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from gpushare.deviceplugin.dra.claims import Claims

logger = logging.getLogger(__name__)

PLUGIN_TYPE: Final = "DRAPlugin"
"""k8s.io/kubelet pluginregistration/v1 ``DRAPlugin``."""
SERVICE: Final = "v1.DRAPlugin"
"""k8s.io/kubelet dra/v1 ``DRAPluginService``: the gRPC service version we serve."""
WATCH_SECONDS: Final = 0.5
"""How often our sockets are checked; a removed one is served afresh."""


class DraPlugin(api_pb2_grpc.DRAPluginServicer):
    """The servicer kubelet calls."""

    def __init__(self, claims: Claims) -> None:
        self._claims = claims

    async def NodePrepareResources(  # noqa: N802 - the gRPC method's name
        self,
        request: api_pb2.NodePrepareResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.NodePrepareResourcesResponse:
        """Each claim's device and CDI IDs, or its error."""
        response = api_pb2.NodePrepareResourcesResponse()
        for claim in request.claims:
            answer = response.claims[claim.uid]
            try:
                prepared = await self._claims.prepare(claim.namespace, claim.name, claim.uid)
            except errors.GpushareError as exc:
                logger.warning("cannot prepare claim %s/%s: %s", claim.namespace, claim.name, exc)
                answer.error = str(exc)
                continue
            device = answer.devices.add(
                request_names=[prepared.request],
                pool_name=prepared.pool,
                device_name=prepared.device,
                cdi_device_ids=list(prepared.cdi_devices),
            )
            if prepared.share_id:
                device.share_id = prepared.share_id
        return response

    async def NodeUnprepareResources(  # noqa: N802
        self,
        request: api_pb2.NodeUnprepareResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.NodeUnprepareResourcesResponse:
        """Forget each claim (an unknown one is already forgotten)."""
        response = api_pb2.NodeUnprepareResourcesResponse()
        for claim in request.claims:
            await self._claims.unprepare(claim.uid)
            response.claims[claim.uid].error = ""
        return response


class Registration(reg_grpc.RegistrationServicer):
    """What kubelet's plugin watcher asks on the registration socket."""

    def __init__(
        self, endpoint: Path, *, on_change: Callable[[bool], None] = lambda registered: None
    ) -> None:
        self._endpoint = endpoint
        self._on_change = on_change
        self.registered = asyncio.Event()

    async def GetInfo(  # noqa: N802
        self, request: reg_pb2.InfoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> reg_pb2.PluginInfo:
        """Our type, driver name, service socket and version."""
        return reg_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=names.DRA_DRIVER,
            endpoint=str(self._endpoint),
            supported_versions=[SERVICE],
        )

    async def NotifyRegistrationStatus(  # noqa: N802
        self,
        request: reg_pb2.RegistrationStatus,
        context: grpc.aio.ServicerContext[object, object],
    ) -> reg_pb2.RegistrationStatusResponse:
        """kubelet's verdict on our registration."""
        if request.plugin_registered:
            logger.info("kubelet registered DRA driver %s", names.DRA_DRIVER)
            self.registered.set()
        else:
            logger.error("kubelet refused DRA driver %s: %s", names.DRA_DRIVER, request.error)
            self.registered.clear()
        self._on_change(self.registered.is_set())
        return reg_pb2.RegistrationStatusResponse()


class DraServer:
    """Serves the DRA service and the registration socket, again if either socket vanishes."""

    def __init__(
        self,
        claims: Claims,
        *,
        kubelet_dir: Path,
        on_registration: Callable[[bool], None] = lambda registered: None,
    ) -> None:
        self.socket = kubelet_dir / "plugins" / names.DRA_DRIVER / "dra.sock"
        self.registration_socket = kubelet_dir / "plugins_registry" / f"{names.DRA_DRIVER}-reg.sock"
        self._plugin = DraPlugin(claims)
        self.registration = Registration(self.socket, on_change=on_registration)
        self._server: grpc.aio.Server | None = None

    async def serve(self) -> None:
        """(Re)start one gRPC server on both sockets."""
        await self.stop()
        server = grpc.aio.server()
        api_pb2_grpc.add_DRAPluginServicer_to_server(self._plugin, server)
        reg_grpc.add_RegistrationServicer_to_server(self.registration, server)
        for path in (self.socket, self.registration_socket):
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            server.add_insecure_port(f"unix://{path}")
        await server.start()
        self._server = server
        logger.info(
            "DRA plugin serving on %s (registration %s)", self.socket, self.registration_socket
        )

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def run(self) -> None:
        """Serve until cancelled; serve afresh when a socket is removed (kubelet's cleanup)."""
        try:
            await self.serve()
            while True:
                await asyncio.sleep(WATCH_SECONDS)
                if not (self.socket.exists() and self.registration_socket.exists()):
                    logger.warning("a DRA plugin socket vanished; serving afresh")
                    await self.serve()
        finally:
            await self.stop()
            for path in (self.socket, self.registration_socket):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
