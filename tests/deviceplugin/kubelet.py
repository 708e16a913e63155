"""The device plugin's tests drive it through the simulator's kubelet stand-in
(:class:`gpushare.simulator.kubelet.Kubelet`: registration, ListAndWatch, preferred allocation,
Allocate, PreStartContainer, PodResources, admission order, restart), with two conveniences."""

from pathlib import Path

import grpc.aio

from gpushare.core import errors, names
from gpushare.core.ids import pod_key
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from gpushare.simulator.kubelet import Kubelet, NewPod

__all__ = ["NewPod", "TestKubelet"]


class TestKubelet(Kubelet):
    """One node's kubelet in ``root`` (its ``--root-dir``)."""

    __test__ = False

    def __init__(self, root: Path) -> None:
        super().__init__("node", root, names.RESOURCE_GPU_MEMORY)

    @property
    def root(self) -> Path:
        return self.kubelet_dir

    async def admit(
        self, namespace: str, pod: str, container: str, units: int
    ) -> dp.ContainerAllocateResponse:
        """Admit one container as kubelet does; the plugin's answer, or its gRPC error, as it
        came."""
        try:
            allocated = await self.allocate(pod_key(namespace, pod), container, units)
        except errors.Conflict as exc:
            if isinstance(exc.__cause__, grpc.aio.AioRpcError):
                raise exc.__cause__ from None
            raise
        return allocated.response
