"""kubelet's PodResources API (v1 ``List``): which pod's container holds which of our device IDs."""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from gpushare.core import errors, names
from gpushare.core.ids import DeviceID, PodKey, pod_key
from gpushare.deviceplugin.api.podresources.v1 import api_pb2, api_pb2_grpc

CALL_SECONDS = 5.0
"""kubelet answers List from memory; five seconds means it is not there."""


@dataclass(frozen=True)
class Holding:
    """One container's devices of our resource."""

    namespace: str
    name: str
    container: str
    devices: tuple[DeviceID, ...]

    @property
    def pod(self) -> PodKey:
        """``namespace/name``."""
        return pod_key(self.namespace, self.name)


class PodResourcesError(errors.GpushareError):
    """kubelet's PodResources socket did not answer."""


class PodResourcesClient:
    """A client of ``<kubelet_dir>/pod-resources/kubelet.sock``."""

    def __init__(self, socket: Path) -> None:
        self._socket = socket
        self._channel: grpc.aio.Channel | None = None

    async def holdings(self) -> list[Holding]:
        """Every container that holds IDs of ``gpushare.io/gpu-memory``."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self._socket}")
        stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        try:
            response = await stub.List(api_pb2.ListPodResourcesRequest(), timeout=CALL_SECONDS)
        except grpc.aio.AioRpcError as exc:
            await self.close()
            raise PodResourcesError(
                f"kubelet PodResources at {self._socket}: {exc.code().name} {exc.details()}"
            ) from exc
        return list(_holdings(response.pod_resources))

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _holdings(pods: Iterable[api_pb2.PodResources]) -> Iterable[Holding]:
    for pod in pods:
        for container in pod.containers:
            ids = [
                DeviceID(device_id)
                for group in container.devices
                if group.resource_name == names.RESOURCE_GPU_MEMORY
                for device_id in group.device_ids
            ]
            if ids:
                yield Holding(pod.namespace, pod.name, container.name, tuple(ids))
