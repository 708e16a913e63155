"""``/healthz`` and ``/readyz`` beside ``/metrics``: alive while the agent's loop runs, ready once
registered with kubelet and, in an MPS mode, while its isolation is up."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
import yaml

from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.main import serve
from tests import cluster
from tests.deviceplugin.conftest import AgentFactory, FakeControl, stop
from tests.deviceplugin.kubelet import TestKubelet

DAEMONSET = Path(__file__).resolve().parents[2] / "manifests" / "device-plugin" / "daemonset.yaml"


@contextlib.asynccontextmanager
async def listening(agent: Agent) -> AsyncIterator[str]:
    """Run ``agent`` as the command does, with its listener; yield the listener's base URL."""
    port = cluster.free_port()
    kubelet_dir = agent.settings.agent.kubelet_dir
    task = asyncio.create_task(serve(agent, kubelet_dir=kubelet_dir, listen=("127.0.0.1", port)))
    base = f"http://127.0.0.1:{port}"
    try:
        await until(lambda: get(f"{base}/healthz"), lambda answer: answer[0] == 200, task)
        yield base
    finally:
        await stop(agent, task)


async def get(url: str) -> tuple[int, str]:
    """Status and body, or (0, the error) while nothing listens."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()
    except aiohttp.ClientConnectionError as exc:
        return 0, str(exc)


async def until(
    fetch: Callable[[], Awaitable[tuple[int, str]]],
    check: Callable[[tuple[int, str]], bool],
    task: "asyncio.Task[None] | None" = None,
    timeout: float = 10.0,
) -> tuple[int, str]:
    """Fetch until ``check`` holds (failing if the agent's task ends first); the last answer."""

    async def waiting() -> tuple[int, str]:
        while True:
            if task is not None and task.done():
                task.result()
            answer = await fetch()
            if check(answer):
                return answer
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(waiting(), timeout)


async def test_alive_at_once_and_ready_once_registered_with_kubelet(
    make_agent: AgentFactory, short_tmp: Path
) -> None:
    async with listening(make_agent(isolation="none")) as base:
        status, body = await get(f"{base}/readyz")
        assert status == 503
        assert "not registered with kubelet" in body
        kubelet = TestKubelet(short_tmp / "kubelet")
        await kubelet.start()
        try:
            await until(lambda: get(f"{base}/readyz"), lambda answer: answer == (200, "ok\n"))
            assert await get(f"{base}/healthz") == (200, "ok\n")
            status, metrics = await get(f"{base}/metrics")
            assert status == 200
            assert 'gpushare_device_plugin_registered{node="gpu-node"} 1.0' in metrics
        finally:
            await kubelet.stop()


def _control_missing(control: FakeControl) -> None:
    control.path.unlink()


def _control_restored(control: FakeControl) -> None:
    FakeControl(control.path.parent)


def _daemon_failing(control: FakeControl) -> None:
    control.fail_flag.touch()


def _daemon_starting(control: FakeControl) -> None:
    control.fail_flag.unlink()


@pytest.mark.parametrize(
    ("isolation", "fault", "repair", "says"),
    [
        ("mps", _control_missing, _control_restored, "MPS control program"),
        ("mps-shared", _daemon_failing, _daemon_starting, "shared MPS daemon is down"),
    ],
    ids=["mps without its control program", "mps-shared without its daemon"],
)
async def test_not_ready_while_the_isolation_is_down(
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    mps_control: FakeControl,
    isolation: str,
    fault: Callable[[FakeControl], None],
    repair: Callable[[FakeControl], None],
    says: str,
) -> None:
    fault(mps_control)
    async with listening(make_agent(isolation=isolation)) as base:
        await kubelet.wait_for(lambda: bool(kubelet.registrations))
        status, body = await until(lambda: get(f"{base}/readyz"), lambda answer: says in answer[1])
        assert status == 503
        assert f"isolation {isolation!r} is down" in body
        assert (await get(f"{base}/healthz"))[0] == 200
        repair(mps_control)
        await until(lambda: get(f"{base}/readyz"), lambda answer: answer == (200, "ok\n"))


async def test_the_daemonsets_probes_ask_what_the_plugin_answers(
    make_agent: AgentFactory, short_tmp: Path
) -> None:
    (container,) = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]["containers"]
    path = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    async with listening(make_agent(isolation="none")) as base:
        # Waiting for kubelet is no reason to restart the plugin, but it is not ready yet.
        assert (await get(base + path["startupProbe"]))[0] == 200
        assert (await get(base + path["livenessProbe"]))[0] == 200
        assert (await get(base + path["readinessProbe"]))[0] == 503
        kubelet = TestKubelet(short_tmp / "kubelet")
        await kubelet.start()
        try:
            await until(lambda: get(base + path["readinessProbe"]), lambda a: a[0] == 200)
        finally:
            await kubelet.stop()


async def test_a_daemon_that_will_not_start_makes_the_cards_unhealthy_until_one_does(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    async with listening(make_agent(isolation="mps")) as base:
        await kubelet.wait_for(lambda: set(kubelet.devices.values()) == {"Healthy"})
        mps_control.fail_flag.touch()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.admit("ns", "pod", "c", 4)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # kubelet stops sending pods here, and the node is not ready, until a daemon starts.
        await kubelet.wait_for(lambda: set(kubelet.devices.values()) == {"Unhealthy"})
        status, body = await get(f"{base}/readyz")
        assert status == 503 and "would not start" in body
        mps_control.fail_flag.unlink()
        await kubelet.wait_for(lambda: set(kubelet.devices.values()) == {"Healthy"})
        await until(lambda: get(f"{base}/readyz"), lambda answer: answer == (200, "ok\n"))
        answer = await kubelet.admit("ns", "pod", "c", 4)
        assert answer.envs["GPUSHARE_GRANTED_BYTES"] == str(4 << 30)
