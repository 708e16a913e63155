"""Proof on a real GPU: gpushare itself packs four vLLM servers onto one card.

    python benchmarks/gpu_proof.py --out DIR --model /tmp/model        # a GPU machine, as root
    python benchmarks/gpu_proof.py --out DIR --dry-run                  # CPU: stand-ins throughout
    python benchmarks/gpu_proof.py --out DIR --merge A.json B.json      # join runs' phases
    python benchmarks/gpu_proof.py --out DIR --plot DIR/gpu-proof.json  # redraw the picture

Four annotated InferenceServices (10, 16, 20 and 24 GiB) go through the real parts, in one process:
the webhook's validation and mutation (its pure core; the patch applied as kube-apiserver applies
it) turn each into a pod; the extender (its HTTP server, ledger and binder, watching an in-memory
API server) places the pod on a ledger fed by the device-plugin agent's node report of this card
(real NVML); kube-scheduler's filter, prioritize and bind calls come from the simulator's client;
kubelet's device manager (the simulator's, over the real gRPC sockets) asks the agent for a
preference and an allocation (the agent runs its real MPS isolation: a control daemon per
container in ``mps``, one per node in ``mps-shared``); each vLLM server starts as kubelet starts
its container: its command and args with ``$(VAR)`` expanded from Allocate's environment by
kubelet's rules, that environment set (``NVIDIA_VISIBLE_DEVICES`` applied as the container
toolkit does, by ``CUDA_VISIBLE_DEVICES``), the MPS pipe directory shared. Every server runs on
this host, so each pod's args name its own port.

Phases (``--phases``): ``alone`` (one server, isolation ``none``: the whole card, no MPS), ``mps``
(the four, refusals, watchdog, exporter, latency beside idle and busy neighbours) and
``mps-shared`` (the four and the latency again). Results go to ``DIR/gpu-proof.json`` after every
step (a run cut short still leaves its figures) and ``DIR/gpu-proof.png`` at the end.
"""

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import jsonpatch
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import config, errors, names, quantities
from gpushare.core.ids import pod_key
from gpushare.deviceplugin import kube as agent_kube
from gpushare.deviceplugin import mps, nvml
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.main import serve
from gpushare.deviceplugin.metrics import Metrics
from gpushare.deviceplugin.podresources import PodResourcesClient
from gpushare.deviceplugin.watchdog import Location
from gpushare.scheduler.kube import Kube
from gpushare.scheduler.service import Extender
from gpushare.simulator import apiserver, kserve, kubelet, mpsfake, scheduling
from gpushare.simulator import vllm as kubelet_rules
from gpushare.simulator.workload import Service
from gpushare.webhook import mutation, validation

GI: Final = quantities.GI
MI: Final = quantities.MI
NODE: Final = "gpu-node"
NAMESPACE: Final = "default"
FIRST_PORT: Final = 8100
INSTANCES: Final = (("llm-10g", 10), ("llm-16g", 16), ("llm-20g", 20), ("llm-24g", 24))
"""The four InferenceServices and their annotations in GiB."""
TARGET: Final = "llm-20g"
"""The instance whose latency is measured in every condition."""
TOO_MANY: Final = ("llm-16g-more", 16)
"""A fifth service that the card cannot hold beside the four: the extender refuses it."""
GREEDY: Final = ("llm-6g-greedy", 6, "0.30")
"""A service that fits, started with a utilization set by hand far above its grant."""
PORTS: Final = {
    name: FIRST_PORT + i
    for i, name in enumerate([*(n for n, _ in INSTANCES), TOO_MANY[0], GREEDY[0]])
}
"""Every server runs on this host's network: each pod's args name a port of its own."""
PROMPT: Final = "San Francisco is a city in California. The quick brown fox jumps over the"
READY_SECONDS: Final = 420.0
"""A vLLM start takes ~70-80 s with torch.compile after a first ~210 s (H100); eager, less."""
REFUSAL_SECONDS: Final = 240.0
STOP_SECONDS: Final = 20.0
KV_MARKER: Final = re.compile(r"GPU KV cache size|Available KV cache memory")
REFUSAL: Final = re.compile(r"Free memory on device.*?(?:processes\.|$)", re.MULTILINE)
"""vLLM's start-up check refusing a utilization above the free memory it sees."""
"""vLLM has sized its cache: the next server may start without disturbing its measurement."""
DRY_CARD: Final = "GPU-00000000-0000-4000-8000-0000000000d7"
DRY_TOTAL: Final = 81559 * MI
DRY_RESERVED: Final = 480 * MI
"""An H100 80GB HBM3 as NVML reports it (measured), for dry runs."""
FAKE_VLLM: Final = Path(__file__).resolve().parent.parent / "tests" / "gpu" / "fakevllm"

Json = dict[str, Any]


# ----- options and results ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    out: Path
    phases: tuple[str, ...]
    dry_run: bool
    fake_server: bool
    model: str
    python: str
    server_pythonpath: str
    mps_control: str
    requests: int
    tokens: int
    busy_streams: int
    eager: bool
    deadline: float
    """Monotonic time after which no new step begins (inf: none)."""


class Results:
    """The run's JSON, written after every step (atomically) so a cut-short run leaves figures."""

    def __init__(self, path: Path, data: Json) -> None:
        self.path = path
        self.data = data
        self.started = time.monotonic()

    def phase(self, name: str) -> Json:
        phases: Json = self.data.setdefault("phases", {})
        entry: Json = phases.setdefault(name, {})
        return entry

    def note(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:7.1f}s"
        print(f"[{stamp}] {text}", flush=True)
        self.data.setdefault("steps", []).append(f"{stamp} {text}")
        self.save()

    def save(self) -> None:
        self.data["summary"] = summarize(self.data)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.path)


# ----- NVML for a dry run ----------------------------------------------------------------------


class DryNvml(nvml.FakeNvml):
    """NVML of one simulated H100: the stand-in servers' reported use and the MPS servers.

    The fake backend's arithmetic and its answers to events and limits (none), with the state
    read afresh from the stand-ins at each look."""

    def __init__(self, state_dir: Path, mps_roots: Callable[[], list[Path]]) -> None:
        super().__init__()
        self.state_dir = state_dir
        self._mps_roots = mps_roots

    @property
    def state(self) -> nvml.FakeState:
        processes = []
        for path in self.state_dir.glob("*.json"):
            pid = int(path.stem)
            if not Path(f"/proc/{pid}").exists():
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                processes.append({"pid": pid, "card": DRY_CARD, "used": int(data["used"])})
        servers = sum(
            1 for root in self._mps_roots() for pipe in root.glob("*") if mpsfake.running(pipe)
        )
        card = {
            "uuid": DRY_CARD,
            "index": 0,
            "total": DRY_TOTAL,
            "reserved": DRY_RESERVED,
            "used": servers * 66 * MI if processes else 0,
        }
        return nvml.FakeState.model_validate({"cards": [card], "processes": processes})


# ----- processes -------------------------------------------------------------------------------


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class TreeLocator:
    """Processes to containers: a container here is the process tree of its server (no cgroups)."""

    def __init__(self) -> None:
        self.roots: dict[int, Location] = {}

    def root_of(self, pid: int) -> int | None:
        seen = 0
        current: int | None = pid
        while current is not None and current > 1 and seen < 64:
            if current in self.roots:
                return current
            current = parent_of(current)
            seen += 1
        return None

    def locate(self, pid: int) -> Location | None:
        root = self.root_of(pid)
        return None if root is None else self.roots[root]


@dataclasses.dataclass
class Instance:
    """One InferenceService's pod and its server."""

    name: str
    gib: int
    port: int
    pod: str = ""
    uid: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Allocate's environment."""
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None
    spawned: float = 0.0
    ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> list[str]:
        return self.log_text().splitlines()[-lines:]


def isvc(name: str, gib: int, port: int, model: str, *, eager: bool) -> Json:
    """An InferenceService as a user writes it: one annotation on a vLLM container."""
    args = [
        f"--port={port}",
        f"--model={model}",
        f"--served-model-name={name}",
        "--load-format=dummy",
        "--max-model-len=4096",
        "--max-num-seqs=32",
        "--gpu-memory-utilization=0.9",
    ]
    if eager:
        args.append("--enforce-eager")
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {names.ANNOTATION_GPU_MEMORY: f"{gib}Gi"},
        },
        "spec": {
            "predictor": {
                "containers": [
                    {
                        "name": kserve.CONTAINER,
                        "image": "vllm/vllm-openai:v0.26.0",
                        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                        "args": args,
                        "env": [{"name": "VLLM_NO_USAGE_STATS", "value": "1"}],
                        "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                    }
                ]
            }
        },
    }


# ----- the stack: API server, agent, kubelet, extender -----------------------------------------


class Stack:
    """The parts of one node under one isolation mode, on loopback and unix sockets."""

    def __init__(self, opts: Options, isolation: str, work: Path, results: Results) -> None:
        self.opts = opts
        self.isolation = isolation
        self.work = work
        self.results = results
        self.api = apiserver.ApiServer()
        self.locator = TreeLocator()
        self.instances: dict[str, Instance] = {}
        self.http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Any]] = []

    @property
    def mps_root(self) -> Path:
        return self.work / "mps"

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        await self.api.start()
        self._closers.append(self.api.stop)
        kubeconfig = self.work / "kubeconfig"
        kubeconfig.write_text(self.api.kubeconfig())
        store = self.api.store
        await store.create(apiserver.resource("", "namespaces"), {"metadata": {"name": NAMESPACE}})
        await store.create(
            apiserver.resource("", "nodes"),
            {
                "metadata": {"name": NODE, "labels": {names.LABEL_ENABLED: "true"}},
                "spec": {},
                "status": {"capacity": {"cpu": "16"}, "allocatable": {"cpu": "16"}},
            },
        )
        self.settings = config.validate(
            {
                "isolation": self.isolation,
                "agent": {
                    "kubelet_dir": str(self.work / "kubelet"),
                    "mps_root": str(self.mps_root),
                    "poll_seconds": 1.0,
                    "heartbeat_seconds": 10.0,
                },
            }
        )
        self.kubelet = kubelet.Kubelet(NODE, self.work / "kubelet", names.RESOURCE_GPU_MEMORY)
        await self.kubelet.start()
        self._closers.append(self.kubelet.stop)
        self.nvml: nvml.Nvml
        if self.opts.dry_run:
            state = self.work / "nvml-state"
            state.mkdir(exist_ok=True)
            self.nvml = DryNvml(state, lambda: [self.mps_root])
        else:
            self.nvml = nvml.RealNvml()
        self.node_api = await agent_kube.KubeApi.connect(kubeconfig)
        self._closers.append(self.node_api.close)
        self.pods = agent_kube.PodCache(self.node_api, NODE)
        self.agent = Agent(
            self.settings,
            node=NODE,
            nvml=self.nvml,
            mode=mps.make(self.settings.isolation, self.mps_root, control=self.opts.mps_control),
            metrics=Metrics(prometheus_client.CollectorRegistry(), node=NODE),
            api=self.node_api,
            pods=self.pods,
            podresources=PodResourcesClient(self.work / "kubelet/pod-resources/kubelet.sock"),
            locator=self.locator,
        )
        plugin = serve(self.agent, kubelet_dir=self.work / "kubelet", pods=self.pods)
        self._tasks.append(asyncio.create_task(plugin))
        await _until(self.kubelet.listed.is_set, 60, "the device plugin lists its IDs")
        node = copy.deepcopy(store.get(apiserver.resource("", "nodes"), "", NODE))
        for key in ("capacity", "allocatable"):
            node["status"][key][names.RESOURCE_GPU_MEMORY] = str(self.kubelet.allocatable)
        await store.put(apiserver.resource("", "nodes"), node, event="MODIFIED")
        self.kube = await Kube.connect(kubeconfig)
        self._closers.append(self.kube.close)
        self.extender = Extender(self.settings, self.kube, instance="gpu-proof")
        await self.extender.start()
        self._closers.append(self.extender.stop)
        await _until(
            lambda: self.extender.ready() and self.extender.book.largest_card_bytes() > 0,
            60,
            "the extender has the agent's node report",
        )
        self.scheduler = scheduling.SchedulerClient(self.extender.url, rng=random.Random(0))
        self._closers.append(self.scheduler.close)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._closers.append(self.http.close)

    async def stop(self) -> None:
        for instance in self.instances.values():
            await stop_server(instance)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        quit_daemons(self.mps_root, self.opts.mps_control)
        self.nvml.close()

    # --- one InferenceService ---

    async def submit(self, name: str, gib: int) -> Json:
        """Admission, scheduling, kubelet's allocation; returns what happened at each step."""
        record: Json = {"name": name, "annotation": f"{gib}Gi"}
        port = PORTS[name]
        largest = self.extender.book.largest_card_bytes()
        manifest = isvc(name, gib, port, self.opts.model, eager=self.opts.eager)
        verdict = validation.inference_service(
            manifest, settings=self.settings, largest_cuda_total_bytes=largest
        )
        if not verdict.allowed:
            record["refused_by"] = "webhook validation"
            record["reason"] = verdict.message
            return record
        await self.api.store.create(apiserver.resource("serving.kserve.io", "inferenceservices"),
                                    manifest)
        pod = kserve.predictor_pod(Service(manifest, "gpu-proof"))
        mutated = mutation.pod(pod, settings=self.settings, largest_cuda_total_bytes=largest)
        if not mutated.allowed:
            record["refused_by"] = "webhook mutation"
            record["reason"] = mutated.message
            return record
        patched = jsonpatch.apply_patch(pod, [dict(op) for op in mutated.patch])
        record["mutation"] = {"patch": list(mutated.patch), "warnings": list(mutated.warnings)}
        created = await self.api.store.create(apiserver.resource("", "pods"), patched)
        outcome = await self.scheduler.schedule(created, [NODE])
        if isinstance(outcome, scheduling.Unschedulable | scheduling.BindFailed):
            record["refused_by"] = "extender"
            record["reason"] = outcome.message
            return record
        meta = created["metadata"]
        bound = self.api.store.get(apiserver.resource("", "pods"), NAMESPACE, meta["name"])
        record["bind_annotations"] = {
            k: v for k, v in bound["metadata"]["annotations"].items() if k.startswith(names.DOMAIN)
        }
        container = bound["spec"]["containers"][0]
        units = int(container["resources"]["limits"][names.RESOURCE_GPU_MEMORY])
        key = pod_key(NAMESPACE, meta["name"])
        await _until(
            lambda: any(p.key == key for p in self.pods.pods()), 30, "the agent sees the pod"
        )
        try:
            allocated = await self.kubelet.allocate(key, container["name"], units)
        except (errors.NoFit, errors.Conflict) as exc:
            record["refused_by"] = "kubelet / device plugin"
            record["reason"] = str(exc)
            return record
        envs = dict(allocated.envs)
        env = kubelet_rules.container_env(container, envs)
        words = kubelet_rules.argv(container, env)
        record["allocate_env"] = envs
        record["mounts"] = [list(m) for m in allocated.mounts]
        record["argv"] = words
        leftover = [w for w in words if "$(" in w]
        if leftover:
            raise RuntimeError(f"{name}: kubelet left {leftover} unexpanded")
        instance = Instance(name, gib, port, pod=meta["name"], uid=meta["uid"], argv=words, env=env)
        self.instances[name] = instance
        return record

    async def spawn(self, instance: Instance, *, extra: Sequence[str] = ()) -> None:
        """Start the container's process as kubelet would, and report it Running."""
        words = [*instance.argv, *extra]
        if words[0] == "python3":
            words[0] = self.opts.python
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in names.SYSTEM_ENV
            and k != "PYTHONPATH"
            and not k.startswith(("CUDA_MPS_", names.ENV_PREFIX))
        }
        env.update(instance.env)
        env["PYTHONPATH"] = self.opts.server_pythonpath
        env["PYTHONUNBUFFERED"] = "1"
        # The container toolkit makes NVIDIA_VISIBLE_DEVICES the only card the container sees.
        env["CUDA_VISIBLE_DEVICES"] = instance.env[names.ENV_VISIBLE_DEVICES]
        if self.opts.dry_run:
            env["FAKE_VLLM_STATE_DIR"] = str(self.work / "nvml-state")
            env["FAKE_VLLM_CUDA_TOTAL"] = str(DRY_TOTAL - DRY_RESERVED)
        instance.log = self.work / f"{instance.name}.log"
        with instance.log.open("ab") as log:
            instance.proc = await asyncio.create_subprocess_exec(
                *words,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        instance.spawned = time.monotonic()
        container_id = hashlib.sha256(instance.uid.encode()).hexdigest()
        self.locator.roots[instance.proc.pid] = Location(instance.uid, container_id)
        pods = apiserver.resource("", "pods")
        pod = copy.deepcopy(self.api.store.get(pods, NAMESPACE, instance.pod))
        pod["status"] = {
            **pod.get("status", {}),
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": kserve.CONTAINER,
                    "containerID": f"containerd://{container_id}",
                    "ready": False,
                    "restartCount": 0,
                }
            ],
        }
        await self.api.store.put(pods, pod, event="MODIFIED")

    async def wait_sized_or_ready(self, instance: Instance, timeout: float) -> None:
        """Until vLLM has sized its KV cache (or is ready, or gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if instance.proc is None or instance.proc.returncode is not None:
                return
            if KV_MARKER.search(instance.log_text()) or await self.healthy(instance):
                return
            await asyncio.sleep(0.5)

    async def wait_ready(self, instance: Instance, timeout: float) -> bool:
        deadline = instance.spawned + timeout
        while time.monotonic() < deadline:
            assert instance.proc is not None
            if instance.proc.returncode is not None:
                return False
            if await self.healthy(instance):
                instance.ready_seconds = time.monotonic() - instance.spawned
                return True
            await asyncio.sleep(0.5)
        return False

    async def healthy(self, instance: Instance) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(
                f"{instance.url}/health", timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def release(self, instance: Instance) -> None:
        """The pod is deleted: kubelet stops it and frees its IDs."""
        await stop_server(instance)
        self.kubelet.release(pod_key(NAMESPACE, instance.pod))
        with contextlib.suppress(apiserver.ApiError):
            await self.api.store.delete(apiserver.resource("", "pods"), NAMESPACE, instance.pod)
        self.instances.pop(instance.name, None)


async def stop_server(instance: Instance) -> None:
    proc = instance.proc
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def quit_daemons(root: Path, control: str) -> None:
    """Quit every MPS control daemon under ``root`` (the agent leaves them for its successor)."""
    for pipe in sorted(root.glob("*")):
        if not (pipe / mps.PID_FILE).exists():
            continue
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)}
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [control], input="quit\n", text=True, env=env, capture_output=True, timeout=15,
                check=False,
            )


async def exit_or_refusal(instance: Instance) -> int | None:
    """The server's exit status once it refused (or ``None`` if it neither exits nor refuses)."""
    assert instance.proc is not None
    deadline = instance.spawned + REFUSAL_SECONDS
    refused_at: float | None = None
    while time.monotonic() < deadline:
        if instance.proc.returncode is not None:
            return instance.proc.returncode
        if refused_at is None and REFUSAL.search(instance.log_text()):
            refused_at = time.monotonic()
            deadline = min(deadline, refused_at + 30)
        await asyncio.sleep(0.5)
    return instance.proc.returncode


async def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s until {what}")
        await asyncio.sleep(0.1)


# ----- measuring ---------------------------------------------------------------------------------


def cache_config(text: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info``."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {}


async def vllm_metrics(stack: Stack, instance: Instance) -> dict[str, str]:
    assert stack.http is not None
    async with stack.http.get(f"{instance.url}/metrics") as response:
        return cache_config(await response.text())


async def complete(stack: Stack, instance: Instance, tokens: int = 16) -> Json:
    assert stack.http is not None
    body = {"model": instance.name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    try:
        async with stack.http.post(f"{instance.url}/v1/completions", json=body) as response:
            answer = await response.json(content_type=None)
            ok = response.status == 200 and bool(answer.get("choices"))
            text = answer["choices"][0]["text"] if ok else str(answer)[:300]
            return {"ok": ok, "status": response.status, "text": text[:80]}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"ok": False, "error": repr(exc)}


async def stream_once(stack: Stack, instance: Instance, tokens: int) -> tuple[float, float, int]:
    """One streamed completion: time to the first token, mean time per later token, tokens."""
    assert stack.http is not None
    body = {
        "model": instance.name,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.perf_counter()
    first = last = 0.0
    chunks = 0
    produced = 0
    async with stack.http.post(f"{instance.url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{instance.name}: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices"):
                now = time.perf_counter()
                chunks += 1
                first = first or now
                last = now
            if event.get("usage"):
                produced = int(event["usage"].get("completion_tokens") or 0)
    produced = produced or chunks
    per_token = (last - first) / (produced - 1) if produced > 1 else math.nan
    return first - began, per_token, produced


def stats(values: Sequence[float]) -> Json:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {}
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e3, 2),
        "min_ms": round(ordered[0] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
    }


async def latency(stack: Stack, instance: Instance, opts: Options) -> Json:
    """``opts.requests`` streamed completions one after another (two warm-ups not counted)."""
    for _ in range(2):
        await stream_once(stack, instance, opts.tokens)
    ttfts, tpots, produced = [], [], []
    for _ in range(opts.requests):
        ttft, tpot, n = await stream_once(stack, instance, opts.tokens)
        ttfts.append(ttft)
        tpots.append(tpot)
        produced.append(n)
    return {
        "requests": opts.requests,
        "output_tokens": opts.tokens,
        "tokens_seen": sorted(set(produced)),
        "ttft": stats(ttfts),
        "per_token": stats(tpots),
    }


@contextlib.asynccontextmanager
async def busy(stack: Stack, others: Sequence[Instance], streams: int, tokens: int
               ) -> AsyncIterator[Json]:
    """Keep ``others`` decoding: ``streams`` concurrent streamed requests each, without pause."""
    stop = asyncio.Event()
    counts: Json = {o.name: 0 for o in others}
    errors: list[str] = []

    async def loop(instance: Instance) -> None:
        while not stop.is_set():
            try:
                _, _, n = await stream_once(stack, instance, tokens)
                counts[instance.name] += n
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                errors.append(f"{instance.name}: {exc!r}")
                await asyncio.sleep(1)

    tasks = [asyncio.create_task(loop(o)) for o in others for _ in range(streams)]
    report: Json = {"streams_per_neighbour": streams, "errors": errors}
    began = time.perf_counter()
    await asyncio.sleep(3)  # the neighbours reach their steady decode first
    try:
        yield report
    finally:
        stop.set()
        elapsed = time.perf_counter() - began
        await asyncio.gather(*tasks, return_exceptions=True)
        report["neighbour_tokens_per_second"] = {
            k: round(v / elapsed, 1) for k, v in counts.items()
        }
        report["errors"] = errors[:10]


async def snapshot(stack: Stack) -> nvml.Snapshot:
    return await asyncio.to_thread(stack.nvml.snapshot)


def per_instance_use(stack: Stack, snap: nvml.Snapshot) -> tuple[dict[str, int], list[Json]]:
    """NVML use summed per server (its process tree), and every GPU process seen."""
    names_by_root = {
        inst.proc.pid: inst.name for inst in stack.instances.values() if inst.proc is not None
    }
    used: dict[str, int] = {}
    listed = []
    for process in snap.processes:
        root = stack.locator.root_of(process.pid)
        owner = names_by_root.get(root) if root is not None else None
        if owner is not None:
            used[owner] = used.get(owner, 0) + process.used_bytes
        listed.append(
            {
                "pid": process.pid,
                "command": command_of(process.pid),
                "used_mib": round(process.used_bytes / MI, 1),
                "instance": owner,
            }
        )
    return used, listed


def card_json(card: nvml.CardReading) -> Json:
    return {
        "uuid": card.uuid,
        "model": card.model,
        "total_mib": card.total_bytes // MI,
        "reserved_mib": card.reserved_bytes // MI,
        "cuda_total_gib": round(card.cuda_total_bytes / GI, 3),
        "used_gib": round(card.used_bytes / GI, 3),
        "free_gib": round(card.free_bytes / GI, 3),
    }


def smi() -> Json:
    """nvidia-smi's view: the card and each compute process (MiB)."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on PATH"}
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,memory.used,memory.free,driver_version",
             "--format=csv,noheader,nounits"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.splitlines()[0].split(",")
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return {"error": repr(exc)}
    processes = {}
    for line in apps:
        pid, _, used = line.partition(",")
        with contextlib.suppress(ValueError):
            processes[int(pid)] = float(used)
    return {
        "total_mib": float(gpu[0]),
        "used_mib": float(gpu[1]),
        "free_mib": float(gpu[2]),
        "driver": gpu[3].strip(),
        "processes_mib": processes,
    }


def exporter_samples(stack: Stack) -> dict[str, float]:
    text = prometheus_client.generate_latest(stack.agent.metrics.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("gpushare_container_used_bytes", "gpushare_container_granted_bytes"):
                samples[f"{sample.name}/{sample.labels['pod']}"] = sample.value
            elif sample.name in ("gpushare_card_used_bytes", "gpushare_card_granted_bytes",
                                 "gpushare_card_mps_servers", "gpushare_grant_violations_total"):
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


async def figures(stack: Stack, *, budgets: Mapping[str, Json]) -> Json:
    """Per instance: grant, vLLM budget, NVML use, use outside grant and budget; the card."""
    await stack.agent.poll()
    snap = await snapshot(stack)
    card = next(c for c in snap.cards if c.error is None)
    used, processes = per_instance_use(stack, snap)
    rows = []
    for inst in stack.instances.values():
        grant = int(inst.env[names.ENV_GRANTED_BYTES])
        info = budgets.get(inst.name, {})
        util = float(info.get("gpu_memory_utilization") or "nan")
        budget = util * card.cuda_total_bytes
        use = used.get(inst.name, 0)
        row: Json = {
            "name": inst.name,
            "grant_gib": round(grant / GI, 3),
            "utilization_env": inst.env.get(names.ENV_VLLM_UTILIZATION),
            "utilization_vllm": info.get("gpu_memory_utilization"),
            "vllm_budget_gib": round(budget / GI, 3),
            "nvml_used_gib": round(use / GI, 3),
            "outside_grant_mib": round((use - grant) / MI, 1),
            "outside_budget_mib": round((use - budget) / MI, 1),
            "startup_seconds": None if inst.ready_seconds is None else round(inst.ready_seconds, 1),
            "num_gpu_blocks": info.get("num_gpu_blocks"),
            "block_size": info.get("block_size"),
        }
        rows.append(row)
    granted = stack.agent.granted_on(card.uuid)
    servers = stack.agent.mode.servers_on(card.uuid)
    return {
        "instances": rows,
        "card": {
            **card_json(card),
            "sum_grants_gib": round(granted / GI, 3),
            "mps_servers": servers,
            "mps_server_bytes_assumed": stack.settings.agent.mps_server_bytes,
            "sum_instances_used_gib": round(sum(used.values()) / GI, 3),
            "left_gib": round((card.cuda_total_bytes - card.used_bytes) / GI, 3),
            "ledger": {
                f"{node}/{uuid}": [round(g / GI, 3), round(c / GI, 3)]
                for (node, uuid), (g, c) in stack.extender.book.card_usage().items()
            },
        },
        "processes": processes,
    }


async def watchdog_and_exporter(stack: Stack) -> Json:
    """The agent attributes each server's use to its pod; its figures against nvidia-smi's."""
    await _until(
        lambda: all(
            p.container_ids for p in stack.pods.pods() if p.name in
            {i.pod for i in stack.instances.values()}
        ),
        30,
        "the agent's pod cache has the container IDs",
    )
    await stack.agent.refresh_holdings()
    await stack.agent.poll()
    await stack.agent.published()  # the container metrics come from the poll's own task
    samples = exporter_samples(stack)
    snap = await snapshot(stack)
    used, _ = per_instance_use(stack, snap)
    view: Json = smi() if not stack.opts.dry_run else {"error": "dry run: no nvidia-smi"}
    per_pid: dict[int, float] = view.get("processes_mib", {})
    rows = []
    for inst in stack.instances.values():
        exported = samples.get(f"gpushare_container_used_bytes/{inst.pod}")
        granted = samples.get(f"gpushare_container_granted_bytes/{inst.pod}")
        root = inst.proc.pid if inst.proc is not None else None
        pids = [p.pid for p in snap.processes if stack.locator.root_of(p.pid) == root]
        smi_mib = sum(per_pid.get(pid, 0.0) for pid in pids)
        row: Json = {
            "name": inst.name,
            "pod": inst.pod,
            "pids": pids,
            "nvml_used_mib": round(used.get(inst.name, 0) / MI, 1),
            "exporter_used_mib": None if exported is None else round(exported / MI, 1),
            "exporter_granted_gib": None if granted is None else round(granted / GI, 3),
            "attributed": exported is not None and exported > 0,
        }
        if "processes_mib" in view:
            row["nvidia_smi_used_mib"] = smi_mib
            if exported is not None and smi_mib:
                row["exporter_vs_smi_percent"] = round(100 * (exported / MI - smi_mib) / smi_mib, 3)
        rows.append(row)
    result: Json = {"containers": rows, "exporter": samples, "nvidia_smi": view}
    if "used_mib" in view:
        card_used = samples.get("gpushare_card_used_bytes", 0.0) / MI
        smi_used, smi_total = float(view["used_mib"]), float(view["total_mib"])
        result["card_used_exporter_mib"] = round(card_used, 1)
        result["card_used_smi_mib"] = smi_used
        result["card_used_diff_percent_of_total"] = round(
            100 * (card_used - smi_used) / smi_total, 3
        )
    return result


# ----- phases ------------------------------------------------------------------------------------


def time_left(opts: Options, need: float) -> bool:
    return time.monotonic() + need < opts.deadline


async def start_all(stack: Stack, results: Results, entry: Json, wanted: Sequence[tuple[str, int]]
                    ) -> list[Instance]:
    """Submit and start each service; the next starts once the last has sized its cache."""
    submitted = entry.setdefault("submitted", [])
    started: list[Instance] = []
    watchers: list[asyncio.Task[bool]] = []
    began = time.monotonic()
    for name, gib in wanted:
        record = await stack.submit(name, gib)
        submitted.append(record)
        if "refused_by" in record:
            results.note(f"{name}: refused by {record['refused_by']}: {record['reason']}")
            continue
        instance = stack.instances[name]
        await stack.spawn(instance)
        results.note(
            f"{name}: granted {instance.env[names.ENV_GRANTED_BYTES]} bytes, utilization"
            f" {instance.env.get(names.ENV_VLLM_UTILIZATION)}, started"
        )
        started.append(instance)
        watchers.append(asyncio.create_task(stack.wait_ready(instance, READY_SECONDS)))
        await stack.wait_sized_or_ready(instance, READY_SECONDS)
    oks = [await watcher for watcher in watchers]
    entry["all_ready_seconds"] = round(time.monotonic() - began, 1)
    return await _keep_ready(stack, results, entry, started, oks)


async def _keep_ready(
    stack: Stack, results: Results, entry: Json, started: Sequence[Instance], oks: Sequence[bool]
) -> list[Instance]:
    """Note each start; release (and keep the log tail of) each server that never answered."""
    for instance, ok in zip(started, oks, strict=True):
        results.note(
            f"{instance.name}: ready {instance.ready_seconds:.1f} s after its start"
            if ok
            else f"{instance.name}: NOT ready"
        )
        if not ok:
            entry.setdefault("failed", {})[instance.name] = instance.log_tail(40)
            await stack.release(instance)
    return [i for i, ok in zip(started, oks, strict=True) if ok]


async def start_together(
    stack: Stack, results: Results, entry: Json, wanted: Sequence[tuple[str, int]]
) -> list[Instance]:
    """Admit every service, then start them all at once, as kubelet starts the pods of a card."""
    submitted = entry.setdefault("submitted", [])
    admitted: list[Instance] = []
    for name, gib in wanted:
        record = await stack.submit(name, gib)
        submitted.append(record)
        if "refused_by" in record:
            results.note(f"{name}: refused by {record['refused_by']}: {record['reason']}")
        else:
            admitted.append(stack.instances[name])
    began = time.monotonic()
    await asyncio.gather(*(stack.spawn(i) for i in admitted))
    results.note(f"started {[i.name for i in admitted]} together")
    oks = await asyncio.gather(*(stack.wait_ready(i, READY_SECONDS) for i in admitted))
    entry["all_ready_seconds"] = round(time.monotonic() - began, 1) if all(oks) else None
    return await _keep_ready(stack, results, entry, admitted, oks)


async def phase_concurrent(opts: Options, results: Results, work: Path, name: str) -> None:
    """The four services started at once (vllm#55827: instances that profile memory together can
    mis-size each other): each one's KV cache, start failures, time to all ready. The isolation
    is ``mps`` unless the phase's name says ``none`` or ``shared`` (``concurrent-none-1``)."""
    isolation = "none" if "-none" in name else "mps-shared" if "-shared" in name else "mps"
    entry = results.phase(name)
    entry["isolation"] = isolation
    entry["start"] = "concurrent"
    stack = Stack(opts, isolation, work, results)
    try:
        await stack.start()
        ready = await start_together(stack, results, entry, INSTANCES)
        entry["ready"] = [i.name for i in ready]
        results.save()
        if ready:
            await measure_instances(stack, entry, "ready")
    finally:
        await stack.stop()
        results.save()


async def measure_instances(stack: Stack, entry: Json, when: str) -> Json:
    budgets = {inst.name: await vllm_metrics(stack, inst) for inst in stack.instances.values()}
    measured = await figures(stack, budgets=budgets)
    entry.setdefault("figures", {})[when] = measured
    return measured


async def phase_alone(opts: Options, results: Results, work: Path) -> None:
    entry = results.phase("alone")
    entry["isolation"] = "none"
    stack = Stack(opts, "none", work, results)
    try:
        await stack.start()
        results.note("alone: stack up (isolation none)")
        ready = await start_all(stack, results, entry, [(TARGET, 20)])
        if not ready:
            return
        target = ready[0]
        entry["completion"] = await complete(stack, target)
        await measure_instances(stack, entry, "ready")
        entry["latency"] = await latency(stack, target, opts)
        results.note(f"alone: latency {entry['latency']['ttft']} / {entry['latency']['per_token']}")
        await measure_instances(stack, entry, "after load")
    finally:
        await stack.stop()
        results.save()


async def phase_shared(opts: Options, results: Results, work: Path, isolation: str) -> None:
    entry = results.phase(isolation)
    entry["isolation"] = isolation
    stack = Stack(opts, isolation, work, results)
    try:
        await stack.start()
        results.note(f"{isolation}: stack up; {stack.kubelet.allocatable} healthy IDs")
        ready = await start_all(stack, results, entry, INSTANCES)
        entry["ready"] = [i.name for i in ready]
        results.save()
        if not ready:
            return
        entry["completions"] = {i.name: await complete(stack, i) for i in ready}
        results.note(f"{isolation}: completions {[c['ok'] for c in entry['completions'].values()]}")
        before = await measure_instances(stack, entry, "ready")
        entry["watchdog"] = await watchdog_and_exporter(stack)
        results.note(f"{isolation}: figures and watchdog recorded")
        if len(ready) < len(INSTANCES):
            return
        if isolation == "mps":
            await refusals(stack, results, entry, before)
        target = next(i for i in ready if i.name == TARGET)
        others = [i for i in ready if i is not target]
        if time_left(opts, 60):
            entry["latency_idle"] = await latency(stack, target, opts)
            results.note(f"{isolation}: idle neighbours {entry['latency_idle']['ttft']}")
        if time_left(opts, 60):
            async with busy(stack, others, opts.busy_streams, opts.tokens) as load:
                measured = await latency(stack, target, opts)
            entry["latency_busy"] = {**measured, "load": load}
            results.note(f"{isolation}: busy neighbours {measured['ttft']} / {load}")
            await measure_instances(stack, entry, "after load")
            entry["watchdog_after_load"] = await watchdog_and_exporter(stack)
    finally:
        await stack.stop()
        results.save()


async def refusals(stack: Stack, results: Results, entry: Json, before: Json) -> None:
    """A fifth service that does not fit; a server whose utilization exceeds its grant."""
    name, gib = TOO_MANY
    record = await stack.submit(name, gib)
    entry["refused_by_extender"] = record
    results.note(f"{name}: {record.get('refused_by', 'NOT refused')}: {record.get('reason', '')}")
    if "refused_by" not in record:
        await stack.release(stack.instances[name])
    name, gib, utilization = GREEDY
    record = await stack.submit(name, gib)
    greedy: Json = {"submitted": record, "utilization_by_hand": utilization}
    entry["refused_by_vllm"] = greedy
    if "refused_by" in record:
        results.note(f"{name}: refused before its start: {record['reason']}")
        return
    instance = stack.instances[name]
    # The container's own entrypoint adds a flag after the webhook's: vLLM takes the last one.
    await stack.spawn(instance, extra=[f"--gpu-memory-utilization={utilization}"])
    code = await exit_or_refusal(instance)
    text = instance.log_text()
    message = REFUSAL.search(text)
    greedy.update(
        {
            "exit_code": code,
            "seconds_to_exit": round(time.monotonic() - instance.spawned, 1),
            "refused": code not in (None, 0) and message is not None,
            "message": message[0] if message else None,
            "log_tail": instance.log_tail(12),
        }
    )
    free = re.search(r"\(([\d.]+)/([\d.]+) GiB\) on startup", text)
    if free:
        greedy["free_seen_gib"] = float(free[1])
        greedy["context_at_check_mib"] = round((gib - float(free[1])) * 1024, 1)
    results.note(f"{name}: exit {code}: {greedy['message']}")
    await stack.release(instance)
    after = await measure_instances(stack, entry, "after refusals")
    completions = {i.name: await complete(stack, i) for i in stack.instances.values()}
    was = {r["name"]: r["nvml_used_gib"] for r in before["instances"]}
    entry["undisturbed"] = {
        "completions_ok": all(c["ok"] for c in completions.values()),
        "alive": all(i.proc is not None and i.proc.returncode is None
                     for i in stack.instances.values()),
        "used_gib_before": was,
        "used_gib_after": {r["name"]: r["nvml_used_gib"] for r in after["instances"]},
    }
    results.note(f"undisturbed: {entry['undisturbed']}")


# ----- summary and picture -------------------------------------------------------------------


def summarize(data: Json) -> Json:
    """The figures a reader wants first: latency in five conditions, the reserve, the card."""
    phases = data.get("phases", {})
    summary: Json = {"latency": {}}
    conditions = [
        ("alone, no MPS", "alone", "latency"),
        ("mps, idle neighbours", "mps", "latency_idle"),
        ("mps, busy neighbours", "mps", "latency_busy"),
        ("mps-shared, idle neighbours", "mps-shared", "latency_idle"),
        ("mps-shared, busy neighbours", "mps-shared", "latency_busy"),
    ]
    for label, phase, key in conditions:
        measured = phases.get(phase, {}).get(key)
        if measured:
            summary["latency"][label] = {
                "ttft_p50_ms": measured["ttft"].get("p50_ms"),
                "ttft_p90_ms": measured["ttft"].get("p90_ms"),
                "per_token_p50_ms": measured["per_token"].get("p50_ms"),
                "per_token_p90_ms": measured["per_token"].get("p90_ms"),
            }
    outside = []
    for phase in ("mps", "mps-shared", "alone"):
        for when, measured in phases.get(phase, {}).get("figures", {}).items():
            for row in measured["instances"]:
                outside.append((row["outside_budget_mib"], row["outside_grant_mib"], phase, when,
                                row["name"]))
    if outside:
        worst = max(outside)
        summary["reserve"] = {
            "configured_mib": config.Settings().reserve_bytes // MI,
            "largest_use_outside_budget_mib": worst[0],
            "where": f"{worst[4]} ({worst[2]}, {worst[3]})",
            "largest_use_outside_grant_mib": max(o[1] for o in outside),
        }
    greedy = phases.get("mps", {}).get("refused_by_vllm", {})
    if "context_at_check_mib" in greedy:
        summary.setdefault("reserve", {})["context_at_check_mib"] = greedy["context_at_check_mib"]
    mps_figures = phases.get("mps", {}).get("figures", {}).get("ready")
    if mps_figures:
        summary["card"] = mps_figures["card"]
    concurrent = _concurrent_summary(phases)
    if concurrent:
        summary["concurrent_starts"] = concurrent
    return summary


def _blocks(phase: Json) -> dict[str, int]:
    rows = phase.get("figures", {}).get("ready", {}).get("instances", [])
    return {r["name"]: int(r["num_gpu_blocks"]) for r in rows if r.get("num_gpu_blocks")}


def _concurrent_summary(phases: Json) -> list[Json]:
    """Each concurrent start against the sequential ``mps`` phase: KV blocks per instance, the
    largest difference, failures, and the time until every server answered."""
    reference = _blocks(phases.get("mps", {}))
    out = []
    for name, phase in phases.items():
        if phase.get("start") != "concurrent":
            continue
        blocks = _blocks(phase)
        differences = {
            n: round(100 * (b - reference[n]) / reference[n], 2)
            for n, b in blocks.items()
            if reference.get(n)
        }
        out.append({
            "phase": name,
            "num_gpu_blocks": blocks,
            "sequential_num_gpu_blocks": {n: reference.get(n) for n in blocks},
            "difference_percent": differences,
            "largest_difference_percent": max(map(abs, differences.values()), default=None),
            "failed": sorted(phase.get("failed", {})),
            "all_ready_seconds": phase.get("all_ready_seconds"),
            "sequential_all_ready_seconds": phases.get("mps", {}).get("all_ready_seconds"),
        })  # fmt: skip
    return out


def plot(data: Json, path: Path) -> None:
    """Per instance: grant, vLLM budget, NVML use; the card's capacity; latency by condition."""
    import matplotlib  # noqa: PLC0415 - only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    phases = data.get("phases", {})
    measured = phases.get("mps", {}).get("figures", {}).get("ready") or next(
        (p["figures"]["ready"] for p in phases.values() if p.get("figures", {}).get("ready")), None
    )
    if measured is None:
        return
    rows = measured["instances"]
    card = measured["card"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [3, 1.1, 2.4]})
    ax = axes[0]
    xs = range(len(rows))
    width = 0.27
    series = [
        ("grant (MPS limit)", "grant_gib", "#9ecae1"),
        ("vLLM budget (utilization x CUDA total)", "vllm_budget_gib", "#3182bd"),
        ("NVML use", "nvml_used_gib", "#e6550d"),
    ]
    for k, (label, key, colour) in enumerate(series):
        values = [r[key] for r in rows]
        bars = ax.bar([x + (k - 1) * width for x in xs], values, width, label=label, color=colour)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["name"] for r in rows])
    ax.set_ylabel("GiB")
    ax.set_title("Per instance (isolation mps)")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    bottom = 0.0
    palette = ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#7f2704"]
    for row, colour in zip(rows, palette, strict=False):
        ax.bar(0, row["nvml_used_gib"], bottom=bottom, color=colour, edgecolor="white")
        ax.annotate(row["name"], (0, bottom + row["nvml_used_gib"] / 2), ha="center",
                    va="center", fontsize=7, color="white")
        bottom += row["nvml_used_gib"]
    other = max(card["used_gib"] - bottom, 0.0)
    ax.bar(0, other, bottom=bottom, color="#636363", label="other use (MPS servers, driver)")
    ax.bar(0, card["left_gib"], bottom=bottom + other, color="#e5f5e0", label="left")
    ax.axhline(card["cuda_total_gib"], color="black", lw=1)
    ax.axhline(card["sum_grants_gib"], color="#3182bd", ls="--", lw=1)
    ax.annotate(f"CUDA total {card['cuda_total_gib']:.2f} GiB", (0.5, card["cuda_total_gib"]),
                xycoords=("axes fraction", "data"), ha="center", va="bottom", fontsize=7)
    ax.annotate(f"sum of grants {card['sum_grants_gib']:.2f} GiB",
                (0.5, card["sum_grants_gib"] + 1.5), xycoords=("axes fraction", "data"),
                ha="center", va="bottom", fontsize=7, color="#08519c")
    ax.set_xticks([])
    ax.set_title(f"The card: {card['model']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02))
    ax = axes[2]
    summary = summarize(data)["latency"]
    labels = list(summary)
    ttft = [summary[k]["ttft_p50_ms"] or 0 for k in labels]
    tpot = [summary[k]["per_token_p50_ms"] or 0 for k in labels]
    def whisker(key: str) -> list[float]:
        return [
            max((summary[k][f"{key}_p90_ms"] or 0) - (summary[k][f"{key}_p50_ms"] or 0), 0)
            for k in labels
        ]

    ttft_up, tpot_up = whisker("ttft"), whisker("per_token")
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], ttft, 0.4, xerr=[[0] * len(ttft), ttft_up], capsize=2,
            label="time to first token (p50, whisker p90)", color="#756bb1")
    ax.barh([y + 0.2 for y in ys], tpot, 0.4, xerr=[[0] * len(tpot), tpot_up], capsize=2,
            label="per output token (p50, whisker p90)", color="#31a354")
    for y, (a, b) in enumerate(zip(ttft, tpot, strict=True)):
        ax.annotate(f"{a:.1f}", (a, y - 0.2), va="center", fontsize=7)
        ax.annotate(f"{b:.1f}", (b, y + 0.2), va="center", fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"Latency of {TARGET}: {data.get('options', {}).get('requests', '?')} streamed"
                 f" requests x {data.get('options', {}).get('output_tokens', '?')} tokens")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- the run ------------------------------------------------------------------------------------


def machine(opts: Options) -> Json:
    info: Json = {"python": sys.version.split()[0], "dry_run": opts.dry_run,
                  "server": "stand-in" if opts.fake_server else "vLLM"}
    if not opts.dry_run:
        view = smi()
        info["nvidia_smi"] = {k: v for k, v in view.items() if k != "processes_mib"}
        with contextlib.suppress(Exception):
            backend = nvml.RealNvml()
            info["cards"] = [card_json(c) for c in backend.snapshot().cards]
            backend.close()
    if not opts.fake_server:
        probe = subprocess.run(
            [opts.python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": opts.server_pythonpath},
            check=False,
        )
        info["vllm_torch"] = probe.stdout.strip() or probe.stderr.strip()[-300:]
    return info


async def run(opts: Options) -> Json:
    opts.out.mkdir(parents=True, exist_ok=True)
    results = Results(opts.out / "gpu-proof.json", {"schema": 1})
    results.data["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    results.data["options"] = {
        "phases": list(opts.phases), "requests": opts.requests, "output_tokens": opts.tokens,
        "busy_streams": opts.busy_streams, "enforce_eager": opts.eager, "model": opts.model,
        "instances": {n: g for n, g in INSTANCES}, "target": TARGET,
    }
    results.data["machine"] = machine(opts)
    results.note(f"machine: {results.data['machine']}")
    work = Path(tempfile.mkdtemp(prefix="gp-", dir="/tmp"))
    control = opts.mps_control
    if opts.dry_run:
        control = str(mpsfake.install(work / "bin"))
        opts = dataclasses.replace(opts, mps_control=control)
    try:
        for phase in opts.phases:
            if not time_left(opts, 90):
                results.note(f"{phase}: skipped, too little time left")
                continue
            results.note(f"phase {phase}")
            try:
                if phase == "alone":
                    await phase_alone(opts, results, work / "alone")
                elif phase.startswith("concurrent"):
                    await phase_concurrent(opts, results, work / phase, phase)
                else:
                    await phase_shared(opts, results, work / phase, phase)
            except Exception as exc:
                results.phase(phase)["error"] = repr(exc)
                results.note(f"{phase}: FAILED: {exc!r}")
            await settle(opts)
    finally:
        keep_logs(work, opts.out)
        results.save()
        with contextlib.suppress(Exception):
            plot(results.data, opts.out / "gpu-proof.png")
        shutil.rmtree(work, ignore_errors=True)
    return results.data


async def settle(opts: Options) -> None:
    """Wait until the card holds no process of ours (the next phase measures a clean card)."""
    if opts.dry_run:
        return
    backend = nvml.RealNvml()
    try:
        for _ in range(60):
            if not (await asyncio.to_thread(backend.snapshot)).processes:
                return
            await asyncio.sleep(0.5)
    finally:
        backend.close()


def keep_logs(work: Path, out: Path) -> None:
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for log in sorted(work.glob("*/*.log")):
            archive.add(log, arcname=f"{log.parent.name}/{log.name}")


def merge(files: Sequence[Path], out: Path) -> Json:
    """Join runs: a later run's phase replaces an earlier one's, which is kept under ``repeats``."""
    data: Json = {}
    runs: list[Json] = []
    repeats: list[Json] = []
    origin: dict[str, Json] = {}
    for path in files:
        part = json.loads(path.read_text())
        card = (part.get("machine", {}).get("cards") or [{}])[0].get("uuid")
        run = {"file": path.name, "started": part.get("started"), "card": card,
               "phases": list(part.get("phases", {}))}
        runs.append(run)
        for name, phase in data.get("phases", {}).items():
            if name in part.get("phases", {}):
                repeats.append({"phase": name, "card": origin[name]["card"],
                                "started": origin[name]["started"], "data": phase})
        origin.update(dict.fromkeys(part.get("phases", {}), run))
        phases = {**data.get("phases", {}), **part.get("phases", {})}
        steps = data.get("steps", []) + [f"[{path.name}] {s}" for s in part.get("steps", [])]
        data = {**data, **part, "phases": phases, "steps": steps}
    data["runs"] = runs
    data["repeats"] = repeats
    data["summary"] = summarize(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-proof.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out / "gpu-proof.png")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNG")
    parser.add_argument("--phases", default="alone,mps,mps-shared")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: fake NVML, stand-in MPS control and vLLM")
    parser.add_argument("--fake-server", action="store_true",
                        help="start the vLLM stand-in instead of vLLM (implied by --dry-run)")
    parser.add_argument("--model", default="/tmp/model")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the containers' python3")
    parser.add_argument("--server-pythonpath", default=os.environ.get("SERVER_PYTHONPATH", ""),
                        help="PYTHONPATH of the servers (where vLLM lives)")
    parser.add_argument("--mps-control", default=mps.CONTROL)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--busy-streams", type=int, default=8)
    parser.add_argument("--no-eager", action="store_true",
                        help="let vLLM compile and capture CUDA graphs (slower start)")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds after which no new step starts (0: none)")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these runs' JSON into --out")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of this JSON into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return 0
    if args.plot:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(json.loads(args.plot.read_text()), args.out / "gpu-proof.png")
        return 0
    fake = args.fake_server or args.dry_run
    pythonpath = str(FAKE_VLLM) if fake else args.server_pythonpath
    opts = Options(
        out=args.out,
        phases=tuple(p for p in args.phases.split(",") if p),
        dry_run=args.dry_run,
        fake_server=fake,
        model=args.model,
        python=args.python,
        server_pythonpath=pythonpath,
        mps_control=args.mps_control,
        requests=args.requests,
        tokens=args.tokens,
        busy_streams=args.busy_streams,
        eager=not args.no_eager,
        deadline=time.monotonic() + args.deadline if args.deadline > 0 else math.inf,
    )
    unknown = {
        p for p in opts.phases if p not in ("alone", "mps", "mps-shared", "concurrent")
        and not re.fullmatch(r"concurrent(-none|-shared)?(-\d+)?", p)
    }
    if unknown:
        parser.error(
            f"unknown phases {sorted(unknown)}: use alone, mps, mps-shared,"
            " concurrent[-none|-shared][-N]"
        )
    data = asyncio.run(run(opts))
    print(json.dumps(data.get("summary", {}), indent=1))
    return 0 if all("error" not in p for p in data.get("phases", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
