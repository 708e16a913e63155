"""The simulated cluster: the real parts as processes on loopback, driven as Kubernetes drives them.

The in-process API server (:mod:`.apiserver`) stands in for kube-apiserver; the simulator plays
kube-apiserver's admission (AdmissionReview over HTTPS to the real webhook), KServe (the predictor
pod), kube-scheduler (filter, prioritize and bind over HTTP to the real extender) and kubelet (the
device manager over gRPC to one real device plugin per node, then a simulated vLLM start against
the node's fake NVML). The parts run as ``gpushare <part>`` processes with the command lines of a
cluster (forked from a warm server, see :mod:`.processes`), each reading the same configuration
file and the API server's kubeconfig; MPS daemons are the stand-in of :mod:`.mpsfake`.

A program that runs a :class:`Simulation` must guard its top level with
``if __name__ == "__main__"``, as ``multiprocessing`` requires of its start methods.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import config, errors, names, nodereport
from gpushare.core.ids import CardUUID, PodKey, pod_key
from gpushare.deviceplugin import devices
from gpushare.simulator import (
    apiserver,
    kserve,
    kubelet,
    mpsfake,
    planes,
    processes,
    scheduling,
)
from gpushare.simulator import vllm as vllm_sim
from gpushare.simulator.controlplane.launch import free_port
from gpushare.simulator.controlplane.rest import ApiError
from gpushare.simulator.fleet import Fleet, Node
from gpushare.simulator.gpus import NodeGpus
from gpushare.simulator.outcome import CardState, Failure, Placement
from gpushare.simulator.workload import Service
from gpushare.webhook import certs

logger = logging.getLogger(__name__)

START_SECONDS: Final = 60.0
"""How long the parts may take to come up (a cold Python start takes 1 to 2 s of a core)."""
STOP_SECONDS: Final = 2.0
"""The parts exit on SIGTERM within a second or two (kopf takes longest); then they are killed."""
AGENT_POLL_SECONDS: Final = 0.2
"""The agents poll the fake NVML fast: a start shows in the node report within a cycle."""
AGENT_HEARTBEAT_SECONDS: Final = 10.0
SETTLE_SECONDS: Final = 10.0
"""Longest wait for the extender to see a deletion and the freed memory (a watch event and a node
report, both well under a second on loopback)."""
NODE_CAPACITY: Final = {"cpu": "192", "memory": "2Ti", "pods": "250"}
"""Room for every pod the simulation places: only GPU memory is scarce."""
ISVCS: Final = apiserver.resource("serving.kserve.io", "inferenceservices")
PODS: Final = apiserver.resource("", "pods")
NODES: Final = apiserver.resource("", "nodes")
NAMESPACES: Final = apiserver.resource("", "namespaces")


@dataclass(slots=True)
class _Running:
    """A placed service: its pod, where it runs, and the simulated vLLM process."""

    service: Service
    pod: PodKey
    node: str
    card: CardUUID
    pid: int | None
    placement: Placement | None
    pipe: Path | None


@dataclass(slots=True)
class Simulation:
    """The cluster for one run. Use as ``async with Simulation(...) as sim``."""

    fleet: Fleet
    base: config.Settings = field(default_factory=config.Settings)
    """The cluster's configuration: unit, reserve, policy, isolation, MPS server size."""
    seed: int = 0
    keep: Path | None = None
    """Keep the work folder (logs, configuration) here instead of a temporary one."""
    progress: Callable[[str], None] = lambda _: None
    """Told each start-up step, for a progress display."""
    control_plane: planes.ControlPlaneName = "embedded"
    """``embedded``, ``real`` (kube-apiserver and kube-scheduler), or ``auto`` (real when built)."""
    workdir: Path = field(init=False)
    settings: config.Settings = field(init=False)
    plane: planes.Plane = field(init=False)
    kubelets: dict[str, kubelet.Kubelet] = field(default_factory=dict)
    node_gpus: dict[str, NodeGpus] = field(default_factory=dict)
    running: dict[str, _Running] = field(default_factory=dict)
    """Placed or start-failed services by key; they hold devices."""
    pending: dict[str, Service] = field(default_factory=dict)
    """Services whose pod waits for a node."""
    submitted: dict[str, Service] = field(default_factory=dict)
    """Every service submitted, by key."""
    _processes: list[processes.Part] = field(default_factory=list)
    _extender_url: str = ""
    _extender_base: str = ""
    _http: aiohttp.ClientSession | None = None
    _namespaces: set[str] = field(default_factory=lambda: {"default"})

    def __post_init__(self) -> None:
        self.plane = planes.choose(self.control_plane, seed=self.seed)

    async def __aenter__(self) -> "Simulation":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- bringing the cluster up ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the API server, the kubelets and the parts, and wait until all are ready."""
        self.workdir = self.keep or Path(tempfile.mkdtemp(prefix="gpushare-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress(self.plane.label)
        await self.plane.start(self.workdir)
        extender_port, webhook_port, probe_port = free_port(), free_port(), free_port()
        env = self._configure(extender_port, webhook_port)
        pair = certs.make(["127.0.0.1", "localhost"])
        tls = certs.write(pair, self.workdir / "certs")
        cli = ["--log-level", "WARNING"]
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self._processes.append(
            processes.Part(
                "gpushare scheduler", [*cli, "scheduler", "--kubeconfig", env["KUBECONFIG"]],
                env=env, log=logs / "scheduler.log",
            )
        )
        self._processes.append(
            processes.Part(
                "gpushare webhook",
                [*cli, "webhook", "--tls-cert", str(tls[1]), "--tls-key", str(tls[2]),
                 "--probe-listen", f"127.0.0.1:{probe_port}"],
                env=env, log=logs / "webhook.log",
            )
        )
        control = mpsfake.install(self.workdir / "bin")
        for node in self.fleet.nodes:
            await self._add_node(node, cli=cli, env=env, control=control, logs=logs)
        self.progress(f"starting {len(self._processes)} processes")
        # The first start waits for the fork server's imports: keep serving the API meanwhile.
        for process in self._processes:
            await asyncio.to_thread(process.start)

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._extender_base = f"http://127.0.0.1:{extender_port}"
        prefix = self.settings.scheduler.url_prefix.strip("/")
        self._extender_url = self._extender_base + (f"/{prefix}" if prefix else "")
        await self._wait_ready(f"http://127.0.0.1:{probe_port}")
        self.progress("admission and scheduling")
        await self.plane.connect(
            extender_url=self._extender_url,
            webhook_url=f"https://127.0.0.1:{webhook_port}",
            ca_pem=pair.ca_pem,
        )

    def _configure(self, extender_port: int, webhook_port: int) -> dict[str, str]:
        """Write the kubeconfig and the shared configuration; the parts' environment."""
        kubeconfig = self.workdir / "kubeconfig"
        kubeconfig.write_text(self.plane.kubeconfig())
        raw = self.base.model_dump(mode="json")
        raw["scheduler"]["listen"] = f"127.0.0.1:{extender_port}"
        raw["webhook"]["listen"] = f"127.0.0.1:{webhook_port}"
        raw["agent"]["poll_seconds"] = AGENT_POLL_SECONDS
        raw["agent"]["heartbeat_seconds"] = AGENT_HEARTBEAT_SECONDS
        self.settings = config.validate(raw)
        config_file = self.workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        # The file carries the whole configuration (this process read the environment into
        # ``base``): variables that would override it in the parts are left out.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(names.ENV_PREFIX)}
        return {
            **inherited,
            "KUBECONFIG": str(kubeconfig),
            names.ENV_CONFIG_FILE: str(config_file),
            "PYTHONUNBUFFERED": "1",
        }

    async def _add_node(
        self, node: Node, *, cli: list[str], env: dict[str, str], control: Path, logs: Path
    ) -> None:
        """The Node object, its fake NVML file, its kubelet and its device-plugin process."""
        await self._register_node(node.name)
        folder = self.workdir / node.name
        folder.mkdir(exist_ok=True)
        node_gpus = NodeGpus(node, folder / "nvml.json")
        node_gpus.write()
        self.node_gpus[node.name] = node_gpus
        agent = kubelet.Kubelet(node.name, folder / "kubelet", names.RESOURCE_GPU_MEMORY)
        await agent.start()
        self.kubelets[node.name] = agent
        self._processes.append(
            processes.Part(
                f"gpushare device-plugin ({node.name})",
                [*cli, "device-plugin", "--kubelet-dir", str(agent.kubelet_dir),
                 "--nvml", f"fake:{node_gpus.path}", "--metrics-listen",
                 f"127.0.0.1:{free_port()}", "--node-name", node.name,
                 "--mps-control", str(control), "--kubeconfig", env["KUBECONFIG"]],
                env={**env, f"{names.ENV_PREFIX}AGENT__MPS_ROOT": str(folder / "mps")},
                log=logs / f"device-plugin-{node.name}.log",
            )
        )

    async def _wait_ready(self, webhook_probe: str) -> None:
        self.progress("device plugins registering")
        await self._until(self._plugins_listed, "every device plugin registers and lists its cards")
        for name, agent in self.kubelets.items():
            await self._set_allocatable(name, agent.allocatable)
        self.progress("node reports")
        await self._until(self._reports_in, "every node carries its agent's report")
        self.progress("extender and webhook")
        await self._until(
            lambda: self._ready(f"{self._extender_base}/readyz"), "the extender is ready"
        )
        await self._until(
            lambda: self._webhook_knows_nodes(webhook_probe),
            "the webhook is ready and knows the node reports",
        )

    async def _register_node(self, name: str) -> None:
        node = {
            "metadata": {
                "name": name,
                "labels": {
                    names.LABEL_ENABLED: "true",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                },
            },
            "spec": {},
            "status": {
                "capacity": dict(NODE_CAPACITY),
                "allocatable": dict(NODE_CAPACITY),
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        }
        await self.plane.add_node(node)

    async def _set_allocatable(self, name: str, count: int) -> None:
        resources = {**NODE_CAPACITY, names.RESOURCE_GPU_MEMORY: str(count)}
        status = {"capacity": resources, "allocatable": resources}
        await self.plane.patch_status(NODES, "", name, status)

    async def _until(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            for process in self._processes:
                if process.exitcode is not None:
                    raise errors.ConfigError(
                        f"{process.name} exited with status {process.exitcode}:\n{process.tail()}"
                    )
            if await check():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.tail(5)}" for p in self._processes)
                raise errors.ConfigError(
                    f"the simulated cluster did not start: waited {START_SECONDS:.0f} s until"
                    f" {what}\n{tails}"
                )
            await asyncio.sleep(0.05)

    async def _plugins_listed(self) -> bool:
        return all(agent.listed.is_set() and agent.devices for agent in self.kubelets.values())

    async def _reports_in(self) -> bool:
        for node in self.fleet.nodes:
            found = await self.plane.get(NODES, "", node.name)
            annotations = found["metadata"].get("annotations")
            text = (annotations or {}).get(names.ANNOTATION_NODE_REPORT)
            if text is None or len(nodereport.decode(text).cards) != len(node.cards):
                return False
        return True

    async def _ready(self, url: str) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(url) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _webhook_knows_nodes(self, probe: str) -> bool:
        if not await self._ready(f"{probe}/readyz"):
            return False
        metrics = await self._scrape(f"{probe}/metrics")
        return metrics.get("gpushare_webhook_reporting_nodes", 0) >= len(self.fleet.nodes)

    async def _scrape(self, url: str) -> dict[str, float]:
        """A Prometheus endpoint's samples, by name with labels (``name{a="b"}``)."""
        assert self._http is not None
        try:
            async with self._http.get(url) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    async def stop(self) -> None:
        """Stop the parts, the kubelets and the API server; remove the work folder."""
        for agent in self.kubelets.values():
            await agent.stop()
        for process in self._processes:
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in self._processes:
            process.reap(deadline - time.monotonic())
        if self._http is not None:
            await self._http.close()
        await self.plane.stop()
        if hasattr(self, "workdir"):
            self._stop_daemons()
            if self.keep is None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_daemons(self) -> None:
        """End the MPS stand-ins the plugins started (each also ends on its own with us)."""
        for pid_file in self.workdir.glob(f"*/mps/*/{mpsfake.PID_FILE}"):
            pid = mpsfake.daemon_pid(pid_file.parent)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)

    # ----- one InferenceService --------------------------------------------------------------

    async def submit(self, service: Service) -> Placement | Failure:
        """``kubectl apply`` of one InferenceService, and everything that follows."""
        self.submitted[service.key] = service
        await self._ensure_namespace(service.namespace)
        denied = await self.plane.admit_inference_service(service.manifest)
        if denied is not None:
            return self._failure(service, "admission", denied)
        admitted = await self.plane.admit_pod(kserve.predictor_pod(service))
        if isinstance(admitted, str):
            await self.plane.delete(ISVCS, service.namespace, service.name)
            return self._failure(service, "mutation", admitted)
        return await self._schedule(service, retry=False)

    async def schedule(self, service: Service) -> Placement | Failure:
        """Another kube-scheduler cycle for a pending service's pod, then kubelet's start."""
        return await self._schedule(service, retry=True)

    async def _schedule(self, service: Service, *, retry: bool) -> Placement | Failure:
        key = _pod_key(service)
        pod = await self.plane.get(PODS, service.namespace, key.split("/", 1)[1])
        nodes = [node.name for node in self.fleet.nodes]
        result = await self.plane.schedule(pod, nodes, retry=retry)
        if isinstance(result, scheduling.Unschedulable):
            self.pending[service.key] = service
            return self._failure(service, "scheduling", result.message)
        if isinstance(result, scheduling.BindFailed):
            self.pending[service.key] = service
            return self._failure(service, "binding", result.message)
        self.pending.pop(service.key, None)
        return await self._start_pod(service, key, result.node)

    async def _start_pod(self, service: Service, key: PodKey, node: str) -> Placement | Failure:
        namespace, name = key.split("/", 1)
        pod = await self.plane.get(PODS, namespace, name)
        target = _gpu_container(pod)
        if target is None:
            return self._failure(service, "allocation", "no container requests GPU memory")
        container, units = target
        agent = self.kubelets[node]
        try:
            allocated = await agent.allocate(key, container["name"], units)
        except (errors.NoFit, errors.Conflict) as exc:
            await self._set_phase(namespace, name, "Failed", "UnexpectedAdmissionError", str(exc))
            return self._failure(service, "allocation", str(exc))
        card = CardUUID(devices.card_of(allocated.devices))
        pipe_text = allocated.envs.get(names.ENV_MPS_PIPE_DIRECTORY)
        pipe = Path(pipe_text) if pipe_text else None
        running = _Running(service, key, node, card, None, None, pipe)
        self.running[service.key] = running
        env = vllm_sim.container_env(container, allocated.envs)
        words = vllm_sim.argv(container, env)
        visible = env.get(names.ENV_VISIBLE_DEVICES, "")
        node_gpus = self.node_gpus[node]
        if visible != card:
            message = f"{names.ENV_VISIBLE_DEVICES}={visible!r}, but the IDs name {card}"
            return self._failure(service, "start", message)
        self._update_servers(node)  # the first client of a daemon starts its MPS server
        outcome = vllm_sim.start(
            words,
            card_free_bytes=node_gpus.free_bytes(card),
            cuda_total_bytes=node_gpus.card(card).model.cuda_total_bytes,
            limit_bytes=self._limit(pipe, env, card),
            minimum_budget_bytes=service.minimum_budget_bytes,
        )
        if isinstance(outcome, vllm_sim.Refused):
            await self._set_phase(namespace, name, "Running", "CrashLoopBackOff", outcome.message)
            return self._failure(service, "start", outcome.message)
        running.pid = node_gpus.start(card, outcome.used_bytes)
        await self._set_phase(namespace, name, "Running", "", "")
        card_index = node_gpus.card(card).index
        running.placement = Placement(
            service=service.key,
            label=service.label,
            pod=name,
            node=node,
            card_uuid=card,
            card_index=card_index,
            requested_bytes=service.requested_bytes or 0,
            granted_bytes=len(allocated.devices) * self.settings.unit_bytes,
            utilization=str(outcome.utilization),
            used_bytes=outcome.used_bytes,
            chosen_card=str((pod["metadata"].get("annotations") or {}).get(
                names.ANNOTATION_CARD_UUID, ""
            )),
        )
        return running.placement

    def _limit(self, pipe: Path | None, env: Mapping[str, str], card: str) -> int | None:
        """The MPS limit the client runs under; none when no daemon serves its pipe directory."""
        if pipe is None or not mpsfake.running(pipe):
            return None
        limits = [
            limit
            for limit in (mpsfake.default_limit_bytes(pipe), vllm_sim.mps_limit_bytes(env, card))
            if limit is not None
        ]
        return min(limits, default=None)

    def _update_servers(self, node: str) -> None:
        """One MPS server per daemon with a client on each card (66 MiB each, measured)."""
        per_card: dict[CardUUID, set[Path]] = {}
        for running in self.running.values():
            if running.node == node and running.pipe is not None and mpsfake.running(running.pipe):
                per_card.setdefault(running.card, set()).add(running.pipe)
        node_gpus = self.node_gpus[node]
        for card in node_gpus.node.cards:
            servers = len(per_card.get(card.uuid, ()))
            node_gpus.set_servers(card.uuid, servers * self.settings.agent.mps_server_bytes)

    async def _set_phase(
        self, namespace: str, name: str, phase: str, reason: str, message: str
    ) -> None:
        status = {"phase": phase}
        if reason:
            status |= {"reason": reason, "message": message}
        await self.plane.patch_status(PODS, namespace, name, status)

    async def _ensure_namespace(self, namespace: str) -> None:
        if namespace not in self._namespaces:
            with contextlib.suppress(ApiError):
                await self.plane.create(NAMESPACES, {"metadata": {"name": namespace}})
            self._namespaces.add(namespace)

    def _failure(self, service: Service, stage: Any, reason: str) -> Failure:
        return Failure(service.key, service.label, service.requested_bytes, stage, reason)

    async def remove(self, service: Service) -> None:
        """``kubectl delete`` of the InferenceService: its pod goes, kubelet stops it."""
        key = _pod_key(service)
        namespace, name = key.split("/", 1)
        await self.plane.delete(PODS, namespace, name)
        await self.plane.delete(ISVCS, service.namespace, service.name)
        self.pending.pop(service.key, None)
        running = self.running.pop(service.key, None)
        if running is None:
            return
        self.kubelets[running.node].release(running.pod)
        if running.pid is not None:
            self.node_gpus[running.node].stop(running.pid)
        self._update_servers(running.node)

    async def settle(self, timeout: float = SETTLE_SECONDS) -> bool:
        """Wait until the extender's ledger shows every card as kubelet's IDs and NVML leave it.

        A deletion reaches the extender through its watch, and freed memory through the next node
        report: kube-scheduler retries waiting pods on such events, so the simulation waits for
        them before it does. Returns whether the ledger caught up within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            samples = await self.extender_samples()
            held = self.kubelet_grants()
            holders: dict[CardUUID, int] = {}
            for running in self.running.values():
                holders[running.card] = holders.get(running.card, 0) + 1
            behind = False
            for card in self.fleet.cards:
                label = f'card="{card.uuid}",index="{card.index}",node="{card.node}"'
                room = samples.get(f"gpushare_scheduler_card_room_bytes{{{label}}}")
                granted = held.get(card.uuid, 0) + holders.get(card.uuid, 0) * self.overhead_bytes
                if room is not None and room not in (0, card.model.cuda_total_bytes - granted):
                    behind = True
                    break
            if not behind:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(AGENT_POLL_SECONDS / 2)

    # ----- reading the state --------------------------------------------------------------------

    @property
    def overhead_bytes(self) -> int:
        """Card memory each allocation takes beyond its grant (the extender's own rule)."""
        return self.settings.allocation_overhead_bytes

    async def extender_calls(self) -> dict[str, int]:
        """Calls the extender answered, by verb, from its own request-duration histogram."""
        samples = await self.extender_samples()
        name = "gpushare_scheduler_request_duration_seconds_count"
        return {
            verb: int(samples.get(f'{name}{{verb="{verb}"}}', 0))
            for verb in ("filter", "prioritize", "bind")
        }

    async def extender_samples(self) -> dict[str, float]:
        """The extender's own metrics, scraped as Prometheus does."""
        return await self._scrape(f"{self._extender_base}/metrics")

    async def cards(self) -> list[CardState]:
        """Every card as the extender's ledger and the node's NVML see it."""
        samples = await self.extender_samples()
        overhead = self.settings.allocation_overhead_bytes
        holders: dict[CardUUID, list[str]] = {}
        for running in self.running.values():
            if running.placement is not None:
                holders.setdefault(running.card, []).append(running.service.key)
        states = []
        for node in self.fleet.nodes:
            node_gpus = self.node_gpus[node.name]
            for card in node.cards:
                label = f'card="{card.uuid}",index="{card.index}",node="{node.name}"'
                granted = int(samples.get(f"gpushare_scheduler_card_granted_bytes{{{label}}}", 0))
                holding = sum(1 for r in self.running.values() if r.card == card.uuid)
                states.append(
                    CardState(
                        node=node.name,
                        index=card.index,
                        uuid=card.uuid,
                        model=card.model.name,
                        total_bytes=card.model.total_bytes,
                        reserved_bytes=card.model.reserved_bytes,
                        capacity_bytes=card.model.cuda_total_bytes,
                        granted_bytes=granted,
                        used_bytes=node_gpus.used_bytes(card.uuid),
                        overhead_bytes=holding * overhead,
                        services=tuple(sorted(holders.get(card.uuid, ()))),
                        cost=self.settings.card_cost(
                            card.model.product, card.model.cuda_total_bytes
                        ),
                    )
                )
        return states

    def kubelet_grants(self) -> dict[CardUUID, int]:
        """Bytes held on each card by the IDs kubelet handed out (the truth)."""
        held: dict[CardUUID, int] = {}
        for agent in self.kubelets.values():
            for holdings in agent.holdings.values():
                for holding in holdings:
                    card = CardUUID(devices.card_of(holding.devices))
                    held[card] = held.get(card, 0) + len(holding.devices) * self.settings.unit_bytes
        return held

    @property
    def unit_bytes(self) -> int:
        return self.settings.unit_bytes

    async def api_requests(self) -> dict[str, int]:
        return await self.plane.requests()

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self._processes)


def _pod_key(service: Service) -> PodKey:
    pod = kserve.predictor_pod(service)
    return pod_key(pod["metadata"]["namespace"], pod["metadata"]["name"])


def _gpu_container(pod: Mapping[str, Any]) -> tuple[dict[str, Any], int] | None:
    """The container that requests GPU memory, and how many units."""
    for container in pod.get("spec", {}).get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(names.RESOURCE_GPU_MEMORY) or (
            resources.get("requests") or {}
        ).get(names.RESOURCE_GPU_MEMORY)
        if amount is not None:
            return container, int(str(amount))
    return None
