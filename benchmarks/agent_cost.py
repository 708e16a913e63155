"""What the device-plugin agent costs a node: one poll, its memory, and Allocate's latency.

    python benchmarks/agent_cost.py                 # 8 fake H100s (CPU only)
    python benchmarks/agent_cost.py --nvml real     # the machine's own cards (NVML)

Prints: the time of one agent poll (NVML read, health, device list, metrics, node report built and
handed to a no-op API, watchdog), the agent's resident memory, and the latency of Allocate over the
plugin's unix socket as kubelet calls it (p50/p99), without isolation and with a daemon per
container (with --nvml real and root, real MPS control daemons; otherwise a stand-in program, so
the figure is our overhead plus two process starts).
"""

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc.aio
import prometheus_client
import yaml

from gpushare.core import config, quantities
from gpushare.deviceplugin import mps, nvml
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from gpushare.deviceplugin.kube import PodEvent
from gpushare.deviceplugin.metrics import Metrics
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.registration import PluginServer

MI = quantities.MI

FAKE_CONTROL = """#!/bin/sh
pipe="$CUDA_MPS_PIPE_DIRECTORY"
if [ "$1" = "-d" ]; then
    sleep 100000 </dev/null >/dev/null 2>&1 &
    echo $! > "$pipe/nvidia-cuda-mps-control.pid"
    exit 0
fi
pid=$(cat "$pipe/nvidia-cuda-mps-control.pid")
while read -r line; do [ "$line" = quit ] && kill "$pid"; done
exit 0
"""


class NullApi:
    """Accepts every write and keeps nothing (the report is still built and encoded)."""

    async def patch_node_annotations(
        self, node: str, annotations: Mapping[str, str | None]
    ) -> None:
        return None

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        return None

    async def list_pods(self, node: str) -> tuple[list[PodInfo], str]:
        return [], "1"

    async def watch_pods(
        self, node: str, resource_version: str, seconds: int
    ) -> AsyncIterator[PodEvent]:
        return
        yield

    async def post_event(
        self, pod: PodInfo, *, reason: str, message: str, warning: bool = True, node: str = ""
    ) -> None:
        return None

    async def evict(self, namespace: str, name: str) -> None:
        return None


def fake_cards(path: Path, count: int) -> None:
    cards = [
        {
            "uuid": f"GPU-{i:08x}-0000-4000-8000-{i:012x}",
            "index": i,
            "total": 81559 * MI,
            "reserved": 480 * MI,
        }
        for i in range(count)
    ]
    processes = [
        {"pid": 1000 + 10 * i + j, "card": c["uuid"], "used": (4 + j) * quantities.GI}
        for i, c in enumerate(cards)
        for j in range(3)
    ]
    path.write_text(yaml.safe_dump({"cards": cards, "processes": processes}))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build(root: Path, backend: nvml.Nvml, isolation: str, control: str) -> Agent:
    settings = config.validate(
        {
            "isolation": isolation,
            "agent": {"kubelet_dir": str(root / "kubelet"), "mps_root": str(root / "mps")},
        }
    )
    return Agent(
        settings,
        node="bench",
        nvml=backend,
        mode=mps.make(settings.isolation, settings.agent.mps_root, control=control),
        metrics=Metrics(prometheus_client.CollectorRegistry(), node="bench"),
        api=NullApi(),
    )


async def poll_cost(agent: Agent, rounds: int) -> list[float]:
    await agent.poll()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await agent.poll()
        await agent.published()  # the report and the watchdog run in a task of their own
        times.append(time.perf_counter() - started)
    return times


async def allocate_latency(agent: Agent, root: Path, rounds: int, *, vary: bool) -> list[float]:
    server = PluginServer(agent, kubelet_dir=root / "kubelet")
    await server.serve()
    card = sorted(agent.cards.values(), key=lambda c: c.index)[0].uuid
    times = []
    try:
        async with grpc.aio.insecure_channel(f"unix://{server.socket}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            for i in range(rounds):
                start = i % 60 if vary else 0
                ids = [f"{card}-{u}" for u in range(start, start + 16)]
                request = api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
                )
                began = time.perf_counter()
                await stub.Allocate(request)
                times.append(time.perf_counter() - began)
    finally:
        await server.stop()
    return times


def show(label: str, times: list[float]) -> None:
    print(
        f"{label:<46} p50 {percentile(times, 0.5) * 1e3:8.3f} ms"
        f"   p99 {percentile(times, 0.99) * 1e3:8.3f} ms"
        f"   mean {statistics.fmean(times) * 1e3:8.3f} ms   n={len(times)}"
    )


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    control = root / "nvidia-cuda-mps-control"
    control.write_text(FAKE_CONTROL)
    control.chmod(0o755)
    program = str(control)
    try:
        rss_start = rss_mib()
        fake_cards(root / "nvml.yaml", args.cards)
        if args.nvml == "real":
            backend: nvml.Nvml = nvml.RealNvml()
            label = "real NVML"
        else:
            backend = nvml.FakeNvml(path=root / "nvml.yaml")
            label = f"{args.cards} fake cards"
        agent = build(root, backend, "none", str(control))
        await agent.start()
        cards = len(agent.cards)
        show(f"poll ({label}, {cards} cards)", await poll_cost(agent, args.polls))
        show(
            "Allocate over the unix socket, isolation none",
            await allocate_latency(agent, root, args.allocations, vary=False),
        )
        print(
            f"{'agent resident memory':<46} {rss_mib():.1f} MiB"
            f" (+{rss_mib() - rss_start:.1f} MiB over the imports)"
        )
        backend.close()
        if args.nvml == "real" and shutil.which(mps.CONTROL) and os.geteuid() == 0:
            backend, program, what = nvml.RealNvml(), mps.CONTROL, "a real daemon start per call"
        else:
            backend = nvml.FakeNvml(path=root / "nvml.yaml")
            program, what = str(control), "stand-in daemon start per call"
        per_container = build(root, backend, "mps", program)
        await per_container.start()
        times = await allocate_latency(
            per_container, root, max(args.allocations // 10, 20), vary=True
        )
        show(f"Allocate, mps ({what})", times)
        backend.close()
    finally:
        for pipe in root.glob("mps/*"):
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)}
            if (pipe / mps.PID_FILE).exists():
                subprocess.run([program], input="quit\n", text=True, env=env, check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvml", choices=["fake", "real"], default="fake")
    parser.add_argument("--cards", type=int, default=8)
    parser.add_argument("--polls", type=int, default=500)
    parser.add_argument("--allocations", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))
