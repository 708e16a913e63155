"""The parts of one node under one isolation mode, on loopback and unix sockets."""

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import prometheus_client

from benchmarks.gpuproof.common import (
    DRY_CARD,
    DRY_RESERVED,
    DRY_TOTAL,
    KV_MARKER,
    MI,
    NAMESPACE,
    NODE,
    REFUSAL,
    REFUSAL_SECONDS,
    STOP_SECONDS,
    Instance,
    Json,
    Options,
    isvc,
    port_of,
    until,
)
from benchmarks.gpuproof.report import Results
from gpushare.core import config, errors, names
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
                **({"reserve_bytes": self.opts.reserve} if self.opts.reserve else {}),
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
        await until(self.kubelet.listed.is_set, 60, "the device plugin lists its IDs")
        node = copy.deepcopy(store.get(apiserver.resource("", "nodes"), "", NODE))
        for key in ("capacity", "allocatable"):
            node["status"][key][names.RESOURCE_GPU_MEMORY] = str(self.kubelet.allocatable)
        await store.put(apiserver.resource("", "nodes"), node, event="MODIFIED")
        self.kube = await Kube.connect(kubeconfig)
        self._closers.append(self.kube.close)
        self.extender = Extender(self.settings, self.kube, instance="gpu-proof")
        await self.extender.start()
        self._closers.append(self.extender.stop)
        await until(
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

    async def submit(
        self, name: str, gib: int, *, annotations: Mapping[str, str] | None = None
    ) -> Json:
        """Admission, scheduling, kubelet's allocation; returns what happened at each step."""
        record: Json = {"name": name, "annotation": f"{gib}Gi", **dict(annotations or {})}
        port = port_of(name)
        largest = self.extender.book.largest_card_bytes()
        manifest = isvc(
            name,
            gib,
            port,
            self.opts.model,
            eager=self.opts.eager,
            max_model_len=self.opts.max_model_len,
            annotations=annotations,
        )
        verdict = validation.inference_service(
            manifest, settings=self.settings, largest_cuda_total_bytes=largest
        )
        if not verdict.allowed:
            record["refused_by"] = "webhook validation"
            record["reason"] = verdict.message
            return record
        await self.api.store.create(
            apiserver.resource("serving.kserve.io", "inferenceservices"), manifest
        )
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
        await until(
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


def quit_daemon(pipe: Path, control: str) -> None:
    """Ask the MPS control daemon of ``pipe`` to quit (nothing if it is gone)."""
    env = {**os.environ, names.ENV_MPS_PIPE_DIRECTORY: str(pipe)}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [control],
            input="quit\n",
            text=True,
            env=env,
            capture_output=True,
            timeout=15,
            check=False,
        )


def quit_daemons(root: Path, control: str) -> None:
    """Quit every MPS control daemon under ``root`` (the agent leaves them for its successor)."""
    for pipe in sorted(root.glob("*")):
        if (pipe / mps.PID_FILE).exists():
            quit_daemon(pipe, control)


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
