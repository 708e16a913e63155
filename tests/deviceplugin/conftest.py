"""Fixtures of the device-plugin tests: a fake NVML file, a fake MPS control program, a test
kubelet, and the real agent and plugin server running against them."""

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from gpushare.core import config, quantities
from gpushare.core.config import Settings
from gpushare.deviceplugin import kube, mps
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from gpushare.deviceplugin.main import serve
from gpushare.deviceplugin.metrics import Metrics
from gpushare.deviceplugin.nvml import FakeNvml, Nvml
from gpushare.deviceplugin.podresources import PodResourcesClient
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.watchdog import ProcessLocator
from tests.deviceplugin.kubelet import TestKubelet

MI = quantities.MI
GI = quantities.GI
CARD_A = "GPU-0a0a0a0a-0000-4000-8000-00000000000a"
CARD_B = "GPU-0b0b0b0b-0000-4000-8000-00000000000b"
H100_TOTAL = 81559 * MI
"""An H100 80GB as NVML reports it (measured)."""
H100_RESERVED = 480 * MI
H100_CUDA_TOTAL = H100_TOTAL - H100_RESERVED
"""79.18 GiB, what CUDA (and vLLM) see: 79 units of 1 GiB."""


def card(uuid: str, index: int, **extra: Any) -> dict[str, Any]:
    """A fake NVML card (an H100 unless told)."""
    return {"uuid": uuid, "index": index, "total": H100_TOTAL, "reserved": H100_RESERVED, **extra}


def write_fake(path: Path, cards: list[dict[str, Any]], **rest: Any) -> None:
    """Write a fake NVML file atomically (the agent never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"cards": cards, **rest}))
    os.replace(tmp, path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nvml_file(short_tmp: Path) -> Path:
    """Two H100s, idle."""
    path = short_tmp / "nvml.yaml"
    write_fake(path, [card(CARD_A, 0), card(CARD_B, 1)])
    return path


FAKE_CONTROL = """#!/bin/bash
# A stand-in for nvidia-cuda-mps-control: -d starts a "daemon" (a sleeping process) and writes its
# pid where the real one does; commands on stdin are recorded, quit stops it, and the default limit
# is left in the pipe directory as "default-limit" (what the daemon would hand a new client).
log={log}
pipe="$CUDA_MPS_PIPE_DIRECTORY"
pidfile="$pipe/nvidia-cuda-mps-control.pid"
if [ "$1" = "-d" ]; then
    [ -e {fail} ] && exit 1
    sleep 100000 </dev/null >/dev/null 2>&1 &
    echo $! > "$pidfile"
    echo $! >> {log}.pids
    echo "$pipe start CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-}}" >> "$log"
    exit 0
fi
pid=$(cat "$pidfile" 2>/dev/null)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "Cannot find MPS control daemon process"
    exit 1
fi
while read -r line; do
    echo "$pipe $line" >> "$log"
    case "$line" in
        quit) kill "$pid"; rm -f "$pidfile" ;;
        set_default_device_pinned_mem_limit*) echo "${{line#* }}" > "$pipe/default-limit" ;;
    esac
done
"""


class FakeControl:
    """The fake MPS control program and what it recorded."""

    def __init__(self, folder: Path) -> None:
        self.log = folder / "mps-commands.log"
        self.fail_flag = folder / "mps-fail"
        self.path = folder / "nvidia-cuda-mps-control"
        self.path.write_text(FAKE_CONTROL.format(log=self.log, fail=self.fail_flag))
        self.path.chmod(0o755)
        self.log.touch()

    def lines(self) -> list[str]:
        """Recorded lines: ``<pipe dir> <command>``."""
        return self.log.read_text().splitlines()

    def kill_all(self) -> None:
        """Stop every daemon it started (by pid), and return once each is gone (or a zombie): a
        SIGKILL takes effect later than the call, the more so on a loaded machine."""
        pids = self.log.with_suffix(".log.pids")
        if not pids.exists():
            return
        killed = [int(pid) for pid in pids.read_text().split()]
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(mps.running(pid) for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def mps_control(short_tmp: Path) -> Iterator[FakeControl]:
    """A fake ``nvidia-cuda-mps-control``."""
    fake = FakeControl(short_tmp)
    yield fake
    fake.kill_all()


def make_settings(root: Path, *, isolation: str = "mps", **agent: Any) -> Settings:
    """Settings for a test node under ``root``; polls fast so tests never wait long."""
    return config.validate(
        {
            "isolation": isolation,
            "agent": {
                "kubelet_dir": str(root / "kubelet"),
                "mps_root": str(root / "mps"),
                "poll_seconds": 0.05,
                **agent,
            },
        }
    )


class StaticPods:
    """Pods of the node from a list the test controls (no API server needed)."""

    def __init__(self, pods: list[PodInfo] | None = None) -> None:
        self.items = list(pods or [])

    def pods(self) -> list[PodInfo]:
        return list(self.items)

    async def refresh(self) -> list[PodInfo]:
        return list(self.items)


AgentFactory = Callable[..., Agent]


def allocate_request(*ids: str) -> dp.AllocateRequest:
    """kubelet's Allocate for one container."""
    return dp.AllocateRequest(
        container_requests=[dp.ContainerAllocateRequest(devices_ids=list(ids))]
    )


@pytest.fixture
def make_agent(short_tmp: Path, nvml_file: Path, mps_control: FakeControl) -> AgentFactory:
    """Build an agent on the fake NVML file, fake MPS control and the test kubelet's folder."""

    def build(
        *,
        isolation: str = "mps",
        pods: Any = None,
        api: kube.NodeApi | None = None,
        locator: ProcessLocator | None = None,
        node: str = "gpu-node",
        settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        registry: prometheus_client.CollectorRegistry | None = None,
        nvml: Nvml | None = None,
        cgroup: Path | None = None,
        stall_seconds: float | None = None,
        cgroup_v2: bool = True,
        **agent_settings: Any,
    ) -> Agent:
        settings = settings or make_settings(short_tmp, isolation=isolation, **agent_settings)
        nvml = nvml or FakeNvml(path=nvml_file)
        return Agent(
            settings,
            node=node,
            nvml=nvml,
            mode=mps.make(
                settings.isolation,
                settings.agent.mps_root,
                control=str(mps_control.path),
                cgroup=cgroup,
                clock=clock,
                nvml=nvml,
                cgroup_v2=cgroup_v2,
            ),
            metrics=Metrics(registry or prometheus_client.CollectorRegistry(), node=node),
            api=api,
            pods=pods,
            podresources=PodResourcesClient(
                settings.agent.kubelet_dir / "pod-resources" / "kubelet.sock"
            ),
            locator=locator,
            clock=clock,
            stall_seconds=stall_seconds,
        )

    return build


@pytest.fixture
async def kubelet(short_tmp: Path) -> AsyncIterator[TestKubelet]:
    """A started test kubelet in ``<short_tmp>/kubelet``."""
    k = TestKubelet(short_tmp / "kubelet")
    await k.start()
    yield k
    await k.stop()


@contextlib.asynccontextmanager
async def running(agent: Agent, kubelet: TestKubelet) -> AsyncIterator[Agent]:
    """Run the agent and its plugin server until the block ends; wait for its first device list."""
    task = asyncio.get_running_loop().create_task(serve(agent, kubelet_dir=kubelet.root))
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices) or task.done())
        if task.done():
            task.result()
        yield agent
    finally:
        await stop(agent, task)


async def stop(agent: Agent, task: "asyncio.Task[None]") -> None:
    """Stop an agent served by ``task``, and close what it opened."""
    agent.nvml.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if agent.podresources is not None:
        await agent.podresources.close()
