"""One node of the simulated cluster on the real card: the parts as processes, the servers as
real processes, on loopback and unix sockets.

The cluster is :class:`gpushare.simulator.cluster.Simulation`, as ``gpushare simulate`` runs it
(the embedded API server, the webhook and the extender as processes, the kubelet stand-in), with
one node whose device plugin reads the real card (``--nvml real``) and starts real MPS daemons.
What a container runtime would add, this module adds: each server is the process tree of its
container, and :class:`ProcMirror` writes a cgroup line for each of its processes where the
plugin's ``--proc-root`` reads them, as the runtime's cgroups would show them. A dry run reads a
fake NVML file fed by the stand-in servers instead (:class:`DryNvmlFile`).
"""

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.gpuproof.common import (
    DRY_CARD,
    DRY_RESERVED,
    DRY_TOTAL,
    GI,
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
)
from benchmarks.gpuproof.report import Results
from gpushare.core import config, names
from gpushare.core.ids import CardUUID, NodeName
from gpushare.deviceplugin import nvml
from gpushare.deviceplugin.watchdog import Location
from gpushare.simulator import apiserver, cluster, kubelet, mpsfake
from gpushare.simulator.cluster import Simulation
from gpushare.simulator.fleet import CATALOGUE, Card, Fleet, Node, lookup
from gpushare.simulator.nodes import NodeBackend
from gpushare.simulator.outcome import Failure
from gpushare.simulator.workload import Service

PODS = apiserver.resource("", "pods")
REFUSED_BY = {
    "admission": "webhook validation",
    "mutation": "webhook mutation",
    "scheduling": "extender",
    "binding": "extender",
    "allocation": "kubelet / device plugin",
}
"""The simulation's stage of a failure, as the proof names who refused."""
MIRROR_SECONDS = 0.1
"""How often the process mirror looks for new processes of a container."""


class DryNvmlFile:
    """The fake NVML file of a dry run: one simulated H100, the stand-in servers' reported use
    and the MPS servers, rewritten whenever they change (the plugin's fake backend reloads it)."""

    def __init__(self, path: Path, state_dir: Path, mps_roots: Callable[[], list[Path]]) -> None:
        self.path = path
        self.state_dir = state_dir
        self._mps_roots = mps_roots
        self._last = ""

    def state(self) -> nvml.FakeState:
        processes = []
        for file in self.state_dir.glob("*.json"):
            pid = int(file.stem)
            if not Path(f"/proc/{pid}").exists():
                file.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(file.read_text())
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

    def write(self) -> None:
        text = self.state().model_dump_json()
        if text != self._last:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.replace(self.path)
            self._last = text

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.write)
            await asyncio.sleep(0.1)


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
    """Processes to containers: a container here is the process tree of its server."""

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


class ProcMirror:
    """``<root>/<pid>/cgroup`` for every process of a container, naming its pod and container
    as kubelet's cgroups do (cgroup v1 layout), and nothing for any other process."""

    def __init__(self, root: Path, locator: TreeLocator) -> None:
        self.root = root
        self.locator = locator
        self._written: set[int] = set()

    def refresh(self) -> None:
        alive = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            where = self.locator.locate(pid)
            if where is None:
                continue
            alive.add(pid)
            if pid not in self._written:
                folder = self.root / str(pid)
                folder.mkdir(parents=True, exist_ok=True)
                path = f"/kubepods/burstable/pod{where.pod_uid}/{where.container_id}"
                (folder / "cgroup").write_text(f"12:memory:{path}\n0::{path}\n")
                self._written.add(pid)
        for pid in self._written - alive:
            with contextlib.suppress(OSError):
                (self.root / str(pid) / "cgroup").unlink()
                (self.root / str(pid)).rmdir()
        self._written &= alive

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(MIRROR_SECONDS)


class Stack:
    """One node of the simulated cluster on the card, under one isolation mode."""

    def __init__(self, opts: Options, isolation: str, work: Path, results: Results) -> None:
        self.opts = opts
        self.isolation = isolation
        self.work = work
        self.results = results
        self.locator = TreeLocator()
        self.instances: dict[str, Instance] = {}
        self.services: dict[str, Service] = {}
        self.http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sim: Simulation | None = None
        self.nvml: nvml.Nvml | None = None
        self.mps_root = Path(tempfile.mkdtemp(prefix="gpm-"))
        """Short: an MPS daemon's socket path must fit in 107 bytes."""

    @property
    def sim(self) -> Simulation:
        assert self._sim is not None, "the stack is not started"
        return self._sim

    @property
    def settings(self) -> config.Settings:
        return self.sim.settings

    @property
    def kubelet(self) -> kubelet.Kubelet:
        return self.sim.kubelets[NODE]

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        mirror = ProcMirror(self.work / "proc", self.locator)
        mirror.root.mkdir(exist_ok=True)
        self._tasks.append(asyncio.create_task(mirror.run()))
        cluster = self.work / "cluster"
        if self.opts.dry_run:
            state = self.work / "nvml-state"
            state.mkdir(exist_ok=True)
            dry = DryNvmlFile(self.work / "nvml.json", state, lambda: [self.mps_root / NODE])
            dry.write()
            self._tasks.append(asyncio.create_task(dry.run()))
            spec = f"fake:{dry.path}"
        else:
            spec = "real"
        self.nvml = nvml.open_backend(spec)
        card = next(c for c in self.nvml.snapshot().cards if c.error is None)
        model = next((m for m in CATALOGUE.values() if m.product == card.model), None)
        node = NodeName(NODE)
        only = Card(node, 0, CardUUID(card.uuid), model or lookup("H100-80GB"))
        fleet = Fleet(spec="gpu-proof", nodes=(Node(node, (only,)),))
        base = config.validate(
            {
                "isolation": self.isolation,
                **({"reserve_bytes": self.opts.reserve} if self.opts.reserve else {}),
            }
        )
        self._sim = Simulation(
            fleet,
            base=base,
            keep=cluster,
            node_backend=NodeBackend(
                nvml=spec,
                mps_control=Path(self.opts.mps_control),
                proc_root=mirror.root,
                mps_root=self.mps_root,
            ),
        )
        await self._sim.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    async def stop(self) -> None:
        for instance in self.instances.values():
            await stop_server(instance)
        if self._sim is not None:
            await self._sim.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.http is not None:
            await self.http.close()
        if self.nvml is not None:
            self.nvml.close()
        shutil.rmtree(self.mps_root, ignore_errors=True)

    # --- one InferenceService ---

    async def submit(
        self, name: str, gib: int, *, annotations: Mapping[str, str] | None = None
    ) -> Json:
        """Admission, scheduling, kubelet's allocation; returns what happened at each step."""
        record: Json = {"name": name, "annotation": f"{gib}Gi", **dict(annotations or {})}
        port = port_of(name)
        manifest = isvc(
            name,
            gib,
            port,
            self.opts.model,
            eager=self.opts.eager,
            max_model_len=self.opts.max_model_len,
            annotations=annotations,
        )
        service = Service(manifest, "gpu-proof")
        admitted = await self.sim.admit(service)
        if isinstance(admitted, Failure):
            record["refused_by"] = REFUSED_BY.get(admitted.stage, admitted.stage)
            record["reason"] = admitted.reason
            return record
        pod_name = admitted.pod.split("/", 1)[1]
        bound = await self.sim.plane.get(PODS, NAMESPACE, pod_name)
        container = next(c for c in bound["spec"]["containers"] if c["name"] == "kserve-container")
        record["mutation"] = {
            "args": container.get("args"),
            "resources": container.get("resources"),
            "schedulerName": bound["spec"].get("schedulerName"),
        }
        record["bind_annotations"] = {
            k: v for k, v in bound["metadata"]["annotations"].items() if k.startswith(names.DOMAIN)
        }
        record["allocate_env"] = dict(admitted.allocate_env)
        record["mounts"] = [list(m) for m in admitted.mounts]
        record["argv"] = list(admitted.argv)
        leftover = [w for w in admitted.argv if "$(" in w]
        if leftover:
            raise RuntimeError(f"{name}: kubelet left {leftover} unexpanded")
        self.services[name] = service
        self.instances[name] = Instance(
            name,
            gib,
            port,
            pod=pod_name,
            uid=bound["metadata"]["uid"],
            argv=list(admitted.argv),
            env=dict(admitted.env),
        )
        return record

    async def spawn(self, instance: Instance, *, extra: Sequence[str] = ()) -> None:
        """Start the container's process as the runtime would, and report it Running."""
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
        status = {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "kserve-container",
                    "containerID": f"containerd://{container_id}",
                    "ready": False,
                    "restartCount": 0,
                }
            ],
        }
        await self.sim.plane.patch_status(PODS, NAMESPACE, instance.pod, status)

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
        service = self.services.pop(instance.name, None)
        if service is not None:
            await self.sim.remove(service)
        self.instances.pop(instance.name, None)

    # --- what the parts report ---

    def snapshot(self) -> nvml.Snapshot:
        assert self.nvml is not None
        return self.nvml.snapshot()

    async def after_poll(self) -> None:
        """Two of the agent's polls: what NVML shows now is in its metrics and node report."""
        await asyncio.sleep(2 * self.settings.agent.poll_seconds + 0.2)

    async def plugin_samples(self) -> dict[str, float]:
        """The device plugin's metrics, scraped as Prometheus does: containers by pod, cards
        summed (one card)."""
        assert self.http is not None
        async with self.http.get(f"{self.sim.nodes.metrics_urls[NODE]}/metrics") as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (
                    "gpushare_container_used_bytes",
                    "gpushare_container_granted_bytes",
                ):
                    samples[f"{sample.name}/{sample.labels['pod']}"] = sample.value
                elif sample.name in (
                    "gpushare_card_used_bytes",
                    "gpushare_card_granted_bytes",
                    "gpushare_card_mps_servers",
                    "gpushare_grant_violations_total",
                ):
                    samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
        return samples

    async def ledger(self, card: str, capacity: int) -> dict[str, list[float]]:
        """The extender's view of the card, from its metrics: [memory taken, capacity] in GiB
        (taken = grants and their MPS servers = capacity less the room it reports)."""
        samples = await self.sim.extender_samples()
        room = cluster.card_sample(samples, cluster.ROOM, node=NODE, card=card, index=0)
        if room is None:
            return {}
        return {f"{NODE}/{card}": [round((capacity - room) / GI, 3), round(capacity / GI, 3)]}


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
