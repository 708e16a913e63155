"""No stall when the Kubernetes API is silent: every API call has a deadline, and kubelet's calls,
the health loop and registration never wait on the API. The API here is a listener that accepts
connections and never answers; ``/healthz`` fails only when the poll loop itself is stuck."""

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from kubernetes_asyncio import client

from gpushare.core import names
from gpushare.deviceplugin import kube
from gpushare.deviceplugin.dra.kube import KubeDraApi
from gpushare.deviceplugin.nvml import FakeNvml, Snapshot, XidEvent
from gpushare.deviceplugin.pods import PodInfo
from gpushare.runtime.errors import ApiError
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    AgentFactory,
    allocate_request,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.deviceplugin.test_probes import get, listening, until

LONG_DEADLINE = 3600.0
"""A deadline long enough to stand for none: nothing the test waits for may depend on it."""
BOUND = 30.0
"""How long the test waits for an answer before calling it a stall."""


@pytest.fixture
async def silent_api() -> AsyncIterator[str]:
    """``http://127.0.0.1:<port>``: accepts every connection, reads nothing, answers nothing."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()


@contextlib.asynccontextmanager
async def api_at(url: str, call_seconds: float) -> AsyncIterator[kube.KubeApi]:
    api = kube.KubeApi(client.ApiClient(client.Configuration(host=url)), call_seconds=call_seconds)
    try:
        yield api
    finally:
        await api.close()


async def test_every_api_call_ends_at_its_deadline(silent_api: str) -> None:
    async with api_at(silent_api, 0.2) as api:
        calls = [
            api.patch_node_annotations("n", {"a": "b"}),
            api.patch_pod_annotations("ns", "p", {"a": "b"}),
            api.list_pods("n"),
            api.evict("ns", "p"),
            api.post_event(PodInfo(namespace="ns", name="p"), reason="Test", message="m"),
        ]
        for call in calls:
            with pytest.raises(ApiError) as caught:
                await asyncio.wait_for(call, BOUND)
            assert caught.value.temporary


async def test_every_dra_api_call_ends_at_its_deadline(silent_api: str) -> None:
    async with client.ApiClient(client.Configuration(host=silent_api)) as api_client:
        api = KubeDraApi(api_client, call_seconds=0.2)
        calls = [
            api.apply_slice({"metadata": {"name": "gpu-node-gpushare"}}),
            api.slice_exists("gpu-node-gpushare"),
            api.get_claim("ns", "claim"),
            api.gpu_memory_allocatable("gpu-node"),
        ]
        for call in calls:
            with pytest.raises(ApiError) as caught:
                await asyncio.wait_for(call, BOUND)
            assert caught.value.temporary


async def test_registers_answers_and_tracks_health_while_the_api_is_silent(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, silent_api: str
) -> None:
    async with api_at(silent_api, LONG_DEADLINE) as api:
        pods = kube.PodCache(api, "gpu-node")
        watch = asyncio.create_task(pods.run())
        agent = make_agent(isolation="none", api=api, pods=pods)
        try:
            # Registration and the first device list come although the first report never lands.
            async with running(agent, kubelet):
                assert len(kubelet.registrations) == 1
                # A size no cached pod asks for: answered from the cache, not from a re-list.
                answer = await asyncio.wait_for(kubelet.admit("ns", "p", "c", 3), BOUND)
                assert answer.envs[names.ENV_VISIBLE_DEVICES] in (CARD_A, CARD_B)
                # A card lost after the report got stuck still goes Unhealthy, and is refused.
                write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1, error="GPU is lost")])
                await kubelet.wait_for(
                    lambda: all(
                        h == "Unhealthy" for d, h in kubelet.devices.items() if d.startswith(CARD_B)
                    )
                )
                assert kubelet.stub is not None
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await kubelet.stub.Allocate(allocate_request(f"{CARD_B}-0"), timeout=BOUND)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert agent.stalled() is None
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch


class StuckNvml:
    """The fake NVML, whose readings block while :attr:`stuck` is set (a hung driver call)."""

    def __init__(self, inner: FakeNvml) -> None:
        self.inner = inner
        self.stuck = threading.Event()
        self.free = threading.Event()

    def snapshot(self) -> Snapshot:
        if self.stuck.is_set():
            self.free.wait()
        return self.inner.snapshot()

    def wait_events(self, timeout_seconds: float) -> list[XidEvent]:
        return self.inner.wait_events(timeout_seconds)

    def close(self) -> None:
        self.free.set()
        self.inner.close()


async def test_healthz_fails_while_the_poll_loop_is_stuck(
    make_agent: AgentFactory, nvml_file: Path
) -> None:
    nvml = StuckNvml(FakeNvml(path=nvml_file))
    agent = make_agent(isolation="none", nvml=nvml, stall_seconds=0.5)
    async with listening(agent) as base:
        nvml.stuck.set()
        status, body = await until(lambda: get(f"{base}/healthz"), lambda a: a[0] != 200)
        assert status == 503 and "no poll finished" in body
        nvml.stuck.clear()
        nvml.free.set()
        await until(lambda: get(f"{base}/healthz"), lambda a: a == (200, "ok\n"))
