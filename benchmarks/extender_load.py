"""The extender alone, at cluster scale: filter, prioritize and bind over HTTP on loopback.

    python -m benchmarks.extender_load [--nodes 500,1000,2000,5000] [--calls 300] [--pods 600]

For each cluster size N: N nodes of 8 x 80 GiB cards and 4 x N pods already placed (20,000 at
5,000 nodes; one node in twenty nearly full, so that filter answers carry failure reasons). Three
processes: ``gpushare scheduler`` itself, started by its command line and pinned to one core; a
stub apiserver (a few lines of aiohttp below) that serves the lists of nodes and pods, holds
watches open without events and accepts Bindings and Events; and this client, which calls the
extender as kube-scheduler does, with every node name (nodeCacheCapable). The stub and the
client share the other cores. The client builds its bodies from pre-encoded parts and reads
answers without decoding them, standing in for kube-scheduler's Go code: the extender is what is
measured.

Printed per size: the ledger's sync time (list and parse of every node and pod), filter and
prioritize latency (p50/p99 of round trips, and the extender's CPU per call), bind latency, what
the first pod of each new size costs (scoring every node for that size once), pods per second
through filter -> prioritize -> bind one pod at a time and with each bind overlapping the next
pod's filter (as kube-scheduler's binding goroutines do), the extender's CPU per pod in each, the
client's, the extender's CPU per pod all in (once the Events it posts after the burst are
posted), and its resident memory. CPU times come from /proc: a busy machine changes the wall
times much more than those.

Targets (5,000 nodes, one core): filter p99 <= 10 ms, >= 300 pods/s.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from gpushare.core import names, nodereport
from gpushare.core.quantities import GI

CARDS = 8
CARD_BYTES = 80 * GI
SIZES = (20, 8, 12, 4, 40, 16, 24, 10, 6, 30)
PREFIX = "/gpushare-scheduler"
ROOT = Path(__file__).resolve().parents[1]


# --- the cluster ----------------------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"gpu-node-{i:05d}"


def card_uuid(node: int, card: int) -> str:
    return f"GPU-{node:08x}-0000-4000-8000-{card:012x}"


def node_object(i: int, heartbeat: str) -> dict[str, Any]:
    cards = [
        {
            "uuid": card_uuid(i, c),
            "index": c,
            "model": "NVIDIA H100 80GB HBM3",
            "total_bytes": CARD_BYTES,
            "reserved_bytes": 0,
            "used_bytes": 0,
            "free_bytes": CARD_BYTES,
            "healthy": True,
        }
        for c in range(CARDS)
    ]
    report = nodereport.NodeReport.model_validate({"heartbeat": heartbeat, "cards": cards}).encode()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name(i),
            "resourceVersion": "1",
            "labels": {names.LABEL_ENABLED: "true", "kubernetes.io/hostname": node_name(i)},
            "annotations": {names.ANNOTATION_NODE_REPORT: report},
        },
        "status": {
            "allocatable": {
                "cpu": "64",
                "memory": "512Gi",
                "pods": "110",
                names.RESOURCE_GPU_MEMORY: str(CARDS * 80),
            }
        },
    }


def pod_object(name: str, units: int, *, node: int | None = None, card: int = 0) -> dict[str, Any]:
    """A pod as the webhook leaves it; bound to ``node``'s ``card``, annotated, if given."""
    annotations = {names.ANNOTATION_GPU_MEMORY: f"{units}Gi", names.ANNOTATION_MUTATED: str(units)}
    spec: dict[str, Any] = {
        "schedulerName": names.SCHEDULER_NAME,
        "containers": [
            {
                "name": "kserve-container",
                "image": "vllm/vllm-openai:latest",
                "args": [
                    "--port",
                    "8080",
                    "--model",
                    "/mnt/models",
                    names.VLLM_UTILIZATION_ARG,
                ],
                "resources": {
                    "limits": {names.RESOURCE_GPU_MEMORY: str(units), "cpu": "4", "memory": "32Gi"},
                    "requests": {
                        names.RESOURCE_GPU_MEMORY: str(units),
                        "cpu": "4",
                        "memory": "32Gi",
                    },
                },
            }
        ],
    }
    if node is not None:
        spec["nodeName"] = node_name(node)
        annotations.update(
            {
                names.ANNOTATION_CARD_UUID: card_uuid(node, card),
                names.ANNOTATION_CARD_INDEX: str(card),
                names.ANNOTATION_CARD_TOTAL: str(CARD_BYTES),
                names.ANNOTATION_GRANTED_BYTES: str(units * GI),
                names.ANNOTATION_BIND_TIME: "2026-01-01T00:00:00.000Z",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "bench",
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "annotations": annotations,
        },
        "spec": spec,
        "status": {"phase": "Pending"},
    }


def cluster(nodes: int, pending: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes, and 4 pods per node already placed plus ``pending`` pods waiting."""
    rng = random.Random(nodes)
    heartbeat = datetime.now(UTC).isoformat()
    node_list = [node_object(i, heartbeat) for i in range(nodes)]
    pods = []
    full = [i for i in range(nodes) if i % 20 == 0]  # 72 GiB on every card
    for i in full:
        pods += [pod_object(f"full-{i}-{c}", 72, node=i, card=c) for c in range(CARDS)]
    others = [i for i in range(nodes) if i % 20]
    for k in range(4 * nodes - len(pods)):
        i = others[k % len(others)]
        card = (k // len(others)) % CARDS
        pods.append(pod_object(f"placed-{k}", rng.choice(SIZES), node=i, card=card))
    pods += [pod_object(f"pending-{k}", SIZES[k % len(SIZES)]) for k in range(pending)]
    return node_list, pods


# --- the stub apiserver (its own process) ---------------------------------------------------------


def serve_stub(port: int, nodes: int, pending: int) -> None:
    node_list, pods = cluster(nodes, pending)
    bodies = {
        "/api/v1/nodes": json.dumps(
            {"kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": node_list}
        ).encode(),
        "/api/v1/pods": json.dumps(
            {"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": pods}
        ).encode(),
    }
    counts = {"binds": 0, "events": 0}

    async def listing(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "true":
            response = web.StreamResponse()
            response.content_type = "application/json"
            await response.prepare(request)
            await asyncio.sleep(float(request.query.get("timeoutSeconds", "300")))
            return response
        return web.Response(body=bodies[request.path], content_type="application/json")

    async def binding(request: web.Request) -> web.Response:
        await request.read()
        counts["binds"] += 1
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Success"}, status=201
        )

    async def event(request: web.Request) -> web.Response:
        counts["events"] += 1
        return web.json_response(await request.json(), status=201)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=2**20)
    app.router.add_get("/api/v1/nodes", listing)
    app.router.add_get("/api/v1/pods", listing)
    app.router.add_post("/api/v1/namespaces/{ns}/pods/{name}/binding", binding)
    app.router.add_post("/apis/events.k8s.io/v1/namespaces/{ns}/events", event)
    app.router.add_get("/stats", stats)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


# --- measuring ------------------------------------------------------------------------------------


def cores() -> tuple[set[int], set[int]]:
    """One core for the extender, the others for this client and the stub (when there are two)."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[-1]}, set(available[:-1])


EXTENDER_CORE, OTHERS = cores()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_ready(http: aiohttp.ClientSession, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")


async def timed(call: Callable[[], Awaitable[Any]], count: int) -> tuple[list[float], Any]:
    times = []
    result = None
    for _ in range(count):
        start = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - start)
    return times, result


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        return await resp.read()


def call_args(pod: bytes, node_names: bytes) -> bytes:
    """An ``ExtenderArgs`` body from pre-encoded parts, as kube-scheduler marshals it."""
    return b'{"Pod":' + pod + b',"Nodes":null,"NodeNames":' + node_names + b"}"


def passed_names(answer: bytes) -> bytes:
    """The raw ``NodeNames`` of a filter answer, checked to carry no ``Error``."""
    if not answer.endswith(b'"Error":""}'):
        raise RuntimeError(f"filter failed: {answer[-300:]!r}")
    start = answer.index(b'"NodeNames":') + len(b'"NodeNames":')
    return answer[start : answer.index(b',"FailedNodes":', start)]


def best_host(answer: bytes) -> str:
    """A node with the highest score in a ``HostPriorityList`` (as ``"Score":7`` or ``": 7"``)."""
    for score in range(10, -1, -1):
        for form in (b'","Score":%d}', b'","Score": %d}'):
            at = answer.find(form % score)
            if at >= 0:
                return answer[answer.rfind(b'"Host":"', 0, at) + len(b'"Host":"') : at].decode()
    raise RuntimeError(f"no scores: {answer[:300]!r}")


async def measure(nodes: int, calls: int, pods: int) -> dict[str, float]:
    stub_port, ext_port = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="gpushare-bench-"))
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "stub",
                "clusters": [
                    {"name": "stub", "cluster": {"server": f"http://127.0.0.1:{stub_port}"}}
                ],
                "users": [{"name": "stub", "user": {"token": "stub"}}],
                "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
            }
        )
    )
    stub = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-stub",
            str(stub_port),
            "--nodes",
            str(nodes),
            "--pods",
            str(pods),
        ]
    )
    os.sched_setaffinity(stub.pid, OTHERS)
    env = {**os.environ, "GPUSHARE_SCHEDULER__HEARTBEAT_TIMEOUT_SECONDS": "86400"}
    extender = None
    base = f"http://127.0.0.1:{ext_port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"http://127.0.0.1:{stub_port}/stats", 120)
            started = time.perf_counter()
            extender = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpushare.cli",
                    "--log-level=WARNING",
                    "scheduler",
                    f"--listen=127.0.0.1:{ext_port}",
                    f"--kubeconfig={kubeconfig}",
                ],
                env=env,
                cwd=ROOT,
            )
            os.sched_setaffinity(extender.pid, EXTENDER_CORE)  # before it starts any thread
            await wait_ready(http, f"{base}/readyz", 300)
            sync = time.perf_counter() - started
            await asyncio.sleep(2)  # the extender takes the listing out of the collector's rounds
            names = [node_name(i) for i in range(nodes)]
            every = json.dumps(names, separators=(",", ":")).encode()
            probe = json.dumps(pod_object("probe", 20), separators=(",", ":")).encode()
            args = call_args(probe, every)

            cpu = cpu_seconds(extender.pid)
            filter_times, answer = await timed(
                lambda: post(http, base + PREFIX + "/filter", args), calls
            )
            filter_cpu = (cpu_seconds(extender.pid) - cpu) / calls
            decoded = json.loads(answer)
            assert len(decoded["NodeNames"]) + len(decoded["FailedNodes"]) == nodes, decoded
            failed = len(decoded["FailedNodes"])
            passed_args = call_args(probe, passed_names(answer))
            cpu = cpu_seconds(extender.pid)
            prio_times, _ = await timed(
                lambda: post(http, base + PREFIX + "/prioritize", passed_args), calls
            )
            prio_cpu = (cpu_seconds(extender.pid) - cpu) / calls

            # kube-scheduler holds each pod decoded already; its Go encoder is not what is measured.
            pending = [
                (pod, json.dumps(pod, separators=(",", ":")).encode())
                for pod in (pod_object(f"pending-{k}", SIZES[k % len(SIZES)]) for k in range(pods))
            ]
            half = pods // 2
            bind_times: list[float] = []

            async def schedule(entry: tuple[dict[str, Any], bytes]) -> Awaitable[None]:
                pod, encoded = entry
                found = await post(http, base + PREFIX + "/filter", call_args(encoded, every))
                scores = await post(
                    http, base + PREFIX + "/prioritize", call_args(encoded, passed_names(found))
                )
                best = best_host(scores)
                bind = json.dumps(
                    {
                        "PodName": pod["metadata"]["name"],
                        "PodNamespace": "bench",
                        "PodUID": pod["metadata"]["uid"],
                        "Node": best,
                    }
                ).encode()

                async def do_bind() -> None:
                    start = time.perf_counter()
                    result = json.loads(await post(http, base + PREFIX + "/bind", bind))
                    bind_times.append(time.perf_counter() - start)
                    if result["Error"]:
                        raise RuntimeError(result["Error"])

                return do_bind()

            # Warm-up: the first pod of each size pays for scoring every node for that size once.
            warm = len(SIZES)
            start = time.perf_counter()
            for pod in pending[:warm]:
                await (await schedule(pod))
            cold = (time.perf_counter() - start) / warm
            cpu = first_cpu = cpu_seconds(extender.pid)
            start = time.perf_counter()
            for pod in pending[warm:half]:
                await (await schedule(pod))
            sequential = (half - warm) / (time.perf_counter() - start)
            cycle_cpu = (cpu_seconds(extender.pid) - cpu) / (half - warm)
            binds: set[asyncio.Task[None]] = set()
            cpu = cpu_seconds(extender.pid)
            client = time.process_time()
            start = time.perf_counter()
            for pod in pending[half:]:
                task = asyncio.ensure_future(await schedule(pod))
                binds.add(task)
                task.add_done_callback(binds.discard)
            await asyncio.gather(*binds)
            pipelined = (pods - half) / (time.perf_counter() - start)
            pipelined_cpu = (cpu_seconds(extender.pid) - cpu) / (pods - half)
            client_cpu = (time.process_time() - client) / (pods - half)
            stats: dict[str, int] = {}
            deadline = time.monotonic() + 120
            while stats.get("events") != pods and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                async with http.get(f"http://127.0.0.1:{stub_port}/stats") as resp:
                    stats = await resp.json()
            all_in_cpu = (cpu_seconds(extender.pid) - first_cpu) / (pods - warm)
            rss = rss_mib(extender.pid)
            assert stats["binds"] == pods and stats["events"] == pods, stats
    finally:
        for process in (extender, stub):
            if process is not None:
                process.terminate()
                process.wait()
    ms = 1000
    return {
        "nodes": nodes,
        "placed": 4 * nodes,
        "failed": failed,
        "sync_s": sync,
        "filter_p50": percentile(filter_times, 0.5) * ms,
        "filter_p99": percentile(filter_times, 0.99) * ms,
        "filter_cpu": filter_cpu * ms,
        "prio_p50": percentile(prio_times, 0.5) * ms,
        "prio_p99": percentile(prio_times, 0.99) * ms,
        "prio_cpu": prio_cpu * ms,
        "bind_p50": percentile(bind_times, 0.5) * ms,
        "bind_p99": percentile(bind_times, 0.99) * ms,
        "cold_ms": cold * ms,
        "cycle_cpu": cycle_cpu * ms,
        "pipelined_cpu": pipelined_cpu * ms,
        "all_in_cpu": all_in_cpu * ms,
        "client_cpu": client_cpu * ms,
        "rss_mib": rss,
        "sequential": sequential,
        "pipelined": pipelined,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes", default="500,1000,2000,5000", help="cluster sizes, comma-separated"
    )
    parser.add_argument("--calls", type=int, default=300, help="filter and prioritize calls timed")
    parser.add_argument("--pods", type=int, default=600, help="pending pods scheduled end to end")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub, int(args.nodes), args.pods)
        return 0
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        os.sched_setaffinity(0, OTHERS)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            row = runner.run(measure(nodes, args.calls, args.pods))
        rows.append(row)
        print(
            f"{row['nodes']:>5} nodes {row['placed']:>6} pods placed | sync {row['sync_s']:5.1f} s"
            f" | filter p50 {row['filter_p50']:5.2f} p99 {row['filter_p99']:5.2f} ms"
            f" (cpu {row['filter_cpu']:4.2f}, {row['failed']} nodes refused)"
            f" | prioritize p50 {row['prio_p50']:5.2f} p99 {row['prio_p99']:5.2f} ms"
            f" (cpu {row['prio_cpu']:4.2f})"
            f" | bind p50 {row['bind_p50']:5.2f} p99 {row['bind_p99']:5.2f} ms"
            f" | first pod of a new size {row['cold_ms']:5.1f} ms"
            f" | pods/s: {row['sequential']:4.0f} one at a time"
            f" (cpu {row['cycle_cpu']:4.2f} ms/pod), {row['pipelined']:4.0f} pipelined"
            f" (cpu {row['pipelined_cpu']:4.2f} ms/pod, client {row['client_cpu']:4.2f});"
            f" all-in with Events"
            f" {row['all_in_cpu']:4.2f} ms/pod = {1000 / row['all_in_cpu']:4.0f} pods/s per core"
            f" | extender RSS {row['rss_mib']:4.0f} MiB",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        scale = last["nodes"] / first["nodes"]
        print(
            f"growth x{scale:g} nodes: filter p50 x{last['filter_p50'] / first['filter_p50']:.1f},"
            f" filter cpu x{last['filter_cpu'] / first['filter_cpu']:.1f},"
            f" pods/s x{last['pipelined'] / first['pipelined']:.2f}"
        )
    last = rows[-1]
    print(
        f"targets at {last['nodes']} nodes: filter p99 {last['filter_p99']:.2f} ms (<= 10):"
        f" {'met' if last['filter_p99'] <= 10 else 'MISSED'};"
        f" {last['pipelined']:.0f} pods/s (>= 300):"
        f" {'met' if last['pipelined'] >= 300 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
