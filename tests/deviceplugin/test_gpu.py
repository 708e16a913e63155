"""On a machine with an NVIDIA GPU (marked ``gpu``; skipped elsewhere, saying why).

- The real NVML backend's inventory matches ``nvidia-smi``, and its free memory follows a process
  that allocates and frees.
- MPS in both modes, through the plugin's own Allocate and PreStartContainer over its socket: three
  processes granted 10, 20 and 30 GiB each run out of memory just under their grant (the limit
  includes the CUDA context) and not much before; under ``mps`` a process that raises its own limit
  variable is still held to its grant; the watchdog attributes each one's use to its container.
- A compute share under ``mps``: a pod annotated ``gpushare.io/compute-share: "30"`` whose process
  raises its own active-thread percentage to 100 still sees at most 30% of the card's SMs; a pod
  without one sees them all.

Needs root (MPS control daemons), the MPS binaries and torch for the MPS part.
"""

import asyncio
import contextlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from gpushare.core import allocations, config, names, quantities
from gpushare.core.allocations import Allocation
from gpushare.deviceplugin import mps, nvml
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.main import serve
from gpushare.deviceplugin.metrics import Metrics
from gpushare.deviceplugin.podresources import PodResourcesClient
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.watchdog import Location
from tests.deviceplugin.conftest import StaticPods
from tests.deviceplugin.kubelet import TestKubelet

pytestmark = pytest.mark.gpu

GI = quantities.GI
MI = quantities.MI
CHUNK = 64 * MI
CONTEXT_SLACK = int(1.25 * GI)
"""How far under its grant a process may run out: its CUDA context (~0.5 GiB inside the MPS limit,
measured) plus one allocation chunk and the allocator's rounding."""

CLIENT = f"""
import sys, torch
torch.cuda.init()
held = []
try:
    while True:
        held.append(torch.empty({CHUNK}, dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError:
    pass
print(len(held) * {CHUNK}, flush=True)
sys.stdin.readline()
"""


def _nvml_or_skip() -> nvml.RealNvml:
    try:
        backend = nvml.RealNvml()
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed")
    snapshot = backend.snapshot()
    if snapshot.error is not None or not snapshot.cards:
        pytest.skip(f"no NVIDIA GPU here: {snapshot.error or 'NVML lists no card'}")
    return backend


@pytest.fixture
def real_nvml() -> Iterator[nvml.RealNvml]:
    backend = _nvml_or_skip()
    yield backend
    backend.close()


def _smi() -> list[dict[str, str]]:
    fields = ["uuid", "index", "name", "memory.total", "memory.used", "memory.free"]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        dict(zip(fields, (v.strip() for v in line.split(",")), strict=True))
        for line in out.splitlines()
    ]


def test_the_real_inventory_matches_nvidia_smi(real_nvml: nvml.RealNvml) -> None:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not on PATH")
    cards = real_nvml.snapshot().cards
    smi = _smi()
    assert [(c.uuid, c.index, c.model) for c in cards] == [
        (s["uuid"], int(s["index"]), s["name"]) for s in smi
    ]
    for c, s in zip(cards, smi, strict=True):
        assert c.total_bytes // MI == int(s["memory.total"])
        assert abs(c.free_bytes // MI - int(s["memory.free"])) <= 0.01 * int(s["memory.total"])
        assert 0 < c.reserved_bytes < c.total_bytes // 10
        print(
            f"card {c.index} {c.model}: total {c.total_bytes // MI} MiB,"
            f" reserved {c.reserved_bytes // MI} MiB, CUDA total {c.cuda_total_bytes / GI:.2f} GiB"
        )


def _torch_or_skip() -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")


def test_free_memory_follows_a_process_within_one_percent(real_nvml: nvml.RealNvml) -> None:
    _torch_or_skip()
    card = real_nvml.snapshot().cards[0]
    before = card.free_bytes
    code = (
        "import sys, torch; x = torch.empty(10 << 30, dtype=torch.uint8, device='cuda');"
        " print('ok', flush=True); sys.stdin.readline()"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": card.uuid}
    with subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        during = next(c for c in real_nvml.snapshot().cards if c.uuid == card.uuid)
        (process,) = [p for p in real_nvml.snapshot().processes if p.pid == proc.pid]
        proc.communicate("\n")
    after = next(c for c in real_nvml.snapshot().cards if c.uuid == card.uuid)
    tolerance = 0.01 * card.total_bytes
    assert abs((before - during.free_bytes) - process.used_bytes) <= tolerance
    assert 10 * GI <= process.used_bytes <= 10 * GI + GI
    assert abs(after.free_bytes - before) <= tolerance


@contextlib.asynccontextmanager
async def _agent(
    root: Path, isolation: str, pods: StaticPods, locations: dict[int, Location]
) -> AsyncIterator[tuple[Agent, TestKubelet]]:
    class Locator:
        def locate(self, pid: int) -> Location | None:
            return locations.get(pid)

    settings = config.validate(
        {
            "isolation": isolation,
            "agent": {
                "kubelet_dir": str(root / "kubelet"),
                "mps_root": str(root / "mps"),
                "poll_seconds": 0.5,
            },
        }
    )
    kubelet = TestKubelet(root / "kubelet")
    await kubelet.start()
    agent = Agent(
        settings,
        node="gpu-node",
        nvml=_nvml_or_skip(),
        mode=mps.make(settings.isolation, settings.agent.mps_root),
        metrics=Metrics(prometheus_client.CollectorRegistry(), node="gpu-node"),
        pods=pods,
        podresources=PodResourcesClient(root / "kubelet" / "pod-resources" / "kubelet.sock"),
        locator=Locator(),
    )
    task = asyncio.get_running_loop().create_task(serve(agent, kubelet_dir=kubelet.root))
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices) or task.done(), 30)
        yield agent, kubelet
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kubelet.stop()
        agent.nvml.close()


def _mps_or_skip() -> None:
    _torch_or_skip()
    if shutil.which(mps.CONTROL) is None:
        pytest.skip(f"{mps.CONTROL} is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("MPS control daemons need root")


@pytest.fixture
def mps_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gs-gpu-", dir="/tmp"))
    yield root
    for pipe in (root / "mps").glob("*"):
        subprocess.run(
            [mps.CONTROL],
            input="quit\n",
            text=True,
            env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)},
            check=False,
            capture_output=True,
        )
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("isolation", ["mps", "mps-shared"])
async def test_mps_holds_each_process_to_its_grant(isolation: str, mps_root: Path) -> None:
    _mps_or_skip()
    grants = {"ten": 10, "twenty": 20, "thirty": 30}
    pods = StaticPods(
        [
            PodInfo(
                namespace="ns",
                name=name,
                uid=f"uid-{name}",
                phase="Running",
                container_ids={f"cid-{name}": "vllm"},
            )
            for name in grants
        ]
    )
    locations: dict[int, Location] = {}
    async with _agent(mps_root, isolation, pods, locations) as (agent, kubelet):
        procs: dict[str, subprocess.Popen[str]] = {}
        allocated: dict[str, int] = {}
        try:
            for name, gib in grants.items():
                response = await kubelet.admit("ns", name, "vllm", gib)
                env: dict[str, Any] = {**os.environ, **dict(response.envs)}
                env["CUDA_VISIBLE_DEVICES"] = response.envs[names.ENV_VISIBLE_DEVICES]
                assert (
                    response.envs[names.ENV_MPS_MEM_LIMIT]
                    == f"{env['CUDA_VISIBLE_DEVICES']}={gib * 1024}M"
                )
                if isolation == "mps" and name == "ten":
                    # The container raises its own limit: the daemon's default still holds it.
                    env[names.ENV_MPS_MEM_LIMIT] = f"{env['CUDA_VISIBLE_DEVICES']}=60G"
                proc = subprocess.Popen(
                    [sys.executable, "-c", CLIENT],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs[name] = proc
                locations[proc.pid] = Location(f"uid-{name}", f"cid-{name}")
            for name, proc in procs.items():
                assert proc.stdout is not None
                allocated[name] = int(await asyncio.to_thread(proc.stdout.readline))
            await agent.poll()
            await agent.published()
            _, containers = agent.metrics.snapshot()
            used = {c.pod.name: c.used_bytes for c in containers}
        finally:
            for proc in procs.values():
                with contextlib.suppress(Exception):
                    proc.communicate("\n", timeout=60)
    for name, gib in grants.items():
        grant = gib * GI
        print(
            f"{isolation}: {name} granted {gib} GiB, allocated {allocated[name] / GI:.2f} GiB,"
            f" NVML {used.get(name, 0) / GI:.2f} GiB"
        )
        assert grant - CONTEXT_SLACK <= allocated[name] < grant, name
        assert allocated[name] <= used.get(name, 0) <= grant + 256 * MI, name


SM_CLIENT = """
import torch
torch.cuda.init()
print(torch.cuda.get_device_properties(0).multi_processor_count, flush=True)
"""


async def test_a_compute_share_holds_a_client_that_raises_its_own(mps_root: Path) -> None:
    _mps_or_skip()
    pods = StaticPods()
    when = datetime.now(UTC)
    sms: dict[str, int] = {}
    async with _agent(mps_root, "mps", pods, {}) as (agent, kubelet):
        card = next(iter(agent.cards.values()))
        for serial, (name, share) in enumerate((("capped", "30"), ("whole", None))):
            recorded = Allocation("vllm", card.uuid, card.index, card.cuda_total_bytes, 4 * GI)
            annotations = allocations.encode([recorded], bind_time=when)
            if share is not None:
                annotations[names.ANNOTATION_COMPUTE_SHARE] = share
            created = when + timedelta(seconds=serial)
            pods.items.append(
                PodInfo(
                    namespace="ns",
                    name=name,
                    uid=f"uid-{name}",
                    annotations=annotations,
                    requests={"vllm": 4},
                    created=created,
                )
            )
            response = await kubelet.admit("ns", name, "vllm", 4)
            env = {**os.environ, **dict(response.envs)}
            env["CUDA_VISIBLE_DEVICES"] = response.envs[names.ENV_VISIBLE_DEVICES]
            if share is not None:
                assert env[names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE] == share
                env[names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE] = "100"  # the tenant raises it
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", SM_CLIENT],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            sms[name] = int(done.stdout.split()[-1])
    print(f"SMs seen: {sms}")
    assert sms["capped"] <= math.ceil(0.3 * sms["whole"]) + 2  # whole TPCs: two SMs of rounding
