"""The simulated cluster: the real parts as processes on loopback, driven as Kubernetes drives them.

A control plane (:mod:`.planes`: the in-process API server of :mod:`.apiserver`, or the real
kube-apiserver and kube-scheduler) sends admission over HTTPS to the real webhook and scheduling
over HTTP to the real extender; the simulator plays KServe (the predictor pod) and, in
:mod:`.nodes`, kubelet (the device manager over gRPC to one real device plugin per node, then a
simulated vLLM start against the node's fake NVML). The parts run as ``gpushare <part>``
processes with the command lines of a cluster (forked from a warm server, see :mod:`.processes`),
each reading the same configuration file and the API server's kubeconfig; MPS daemons are the
stand-in of :mod:`.mpsfake`.

A program that runs a :class:`Simulation` must guard its top level with
``if __name__ == "__main__"``, as ``multiprocessing`` requires of its start methods.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import config, dra, errors, names, nodereport
from gpushare.core.ids import CardUUID, PodKey, pod_key
from gpushare.simulator import apiserver, kserve, kubelet, mpsfake, planes, processes, scheduling
from gpushare.simulator.controlplane.launch import free_port
from gpushare.simulator.controlplane.rest import ApiError
from gpushare.simulator.fleet import Fleet, Node
from gpushare.simulator.gpus import NodeGpus
from gpushare.simulator.nodes import (
    CLAIMS,
    Admitted,
    NodeBackend,
    Nodes,
    Running,
    failure,
    quit_daemons,
    stop_daemons,
)
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
SLICES: Final = apiserver.Resource(
    "resource.k8s.io", "v1", "resourceslices", "ResourceSlice", False
)
DEVICE_CLASSES: Final = apiserver.Resource(
    "resource.k8s.io", "v1", "deviceclasses", "DeviceClass", False
)

GRANTED: Final = "gpushare_scheduler_card_granted_bytes"
ROOM: Final = "gpushare_scheduler_card_room_bytes"


def card_sample(
    samples: Mapping[str, float], metric: str, *, node: str, card: str, index: int
) -> float | None:
    """One per-card sample of the extender's metrics (:meth:`Simulation.extender_samples`)."""
    return samples.get(f'{metric}{{card="{card}",index="{index}",node="{node}"}}')


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
    node_backend: NodeBackend = field(default_factory=NodeBackend)
    """What the nodes' device plugins run against (simulated nodes unless told otherwise)."""
    workdir: Path = field(init=False)
    settings: config.Settings = field(init=False)
    plane: planes.Plane = field(init=False)
    nodes: Nodes = field(init=False)
    """The nodes' kubelets and GPUs, and the services they run."""
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
        dra = self.base.backend == "dra"
        self.plane = planes.choose(self.control_plane, seed=self.seed, dra=dra)
        self.nodes = Nodes(self.base, self._set_phase, self.plane.get, self.node_backend)

    @property
    def kubelets(self) -> dict[str, kubelet.Kubelet]:
        return self.nodes.kubelets

    @property
    def node_gpus(self) -> dict[str, NodeGpus]:
        return self.nodes.node_gpus

    @property
    def running(self) -> dict[str, Running]:
        """Placed or start-failed services by key; they hold devices."""
        return self.nodes.running

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
                "gpushare scheduler",
                [*cli, "scheduler", "--kubeconfig", env["KUBECONFIG"]],
                env=env,
                log=logs / "scheduler.log",
            )
        )
        self._processes.append(
            processes.Part(
                "gpushare webhook",
                [
                    *cli,
                    "webhook",
                    "--tls-cert",
                    str(tls[1]),
                    "--tls-key",
                    str(tls[2]),
                    "--probe-listen",
                    f"127.0.0.1:{probe_port}",
                ],
                env=env,
                log=logs / "webhook.log",
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
        self.nodes.settings = self.settings
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
        log = logs / f"device-plugin-{node.name}.log"
        part = await self.nodes.add(
            node, self.workdir / node.name, cli=cli, env=env, control=control, log=log
        )
        self._processes.append(part)

    async def _wait_ready(self, webhook_probe: str) -> None:
        if self.nodes.dra:
            self.progress("DRA plugins registering")
            await self.nodes.register_dra(START_SECONDS)
            await self._until(self._slices_published, "every node publishes its ResourceSlice")
            with contextlib.suppress(ApiError):  # there already: fine
                await self.plane.create(DEVICE_CLASSES, dra.device_class())
        else:
            self.progress("device plugins registering")
            await self._until(
                self._plugins_listed, "every device plugin registers and lists its cards"
            )
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
        return self.nodes.listed()

    async def _slices_published(self) -> bool:
        published = {s["spec"].get("nodeName") for s in await self.plane.items(SLICES)}
        return all(node.name in published for node in self.fleet.nodes)

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
        await self.nodes.stop()
        for process in self._processes:
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in self._processes:
            process.reap(deadline - time.monotonic())
        if self._http is not None:
            await self._http.close()
        await self.plane.stop()
        if hasattr(self, "workdir"):
            roots = list(self.nodes.mps_roots.values())
            if self.node_backend.mps_control is not None:
                for root in roots:
                    await asyncio.to_thread(quit_daemons, root, self.node_backend.mps_control)
            stop_daemons(roots)
            if self.keep is None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ----- one InferenceService --------------------------------------------------------------

    async def submit(self, service: Service) -> Placement | Failure:
        """``kubectl apply`` of one InferenceService, and everything that follows."""
        bound = await self._bind(service)
        if isinstance(bound, Failure):
            return bound
        return await self.nodes.start_pod(service, *bound)

    async def admit(self, service: Service) -> Admitted | Failure:
        """:meth:`submit` up to kubelet's admission: the pod holds its IDs, and starting its
        container is the caller's (a real process, as the GPU proof runs)."""
        bound = await self._bind(service)
        if isinstance(bound, Failure):
            return bound
        return await self.nodes.admit(service, *bound)

    async def schedule(self, service: Service) -> Placement | Failure:
        """Another kube-scheduler cycle for a pending service's pod, then kubelet's start."""
        bound = await self._schedule(service, retry=True)
        if isinstance(bound, Failure):
            return bound
        return await self.nodes.start_pod(service, *bound)

    async def _bind(self, service: Service) -> tuple[PodKey, str, planes.Obj] | Failure:
        """Admission of the InferenceService and its predictor pod, then scheduling."""
        self.submitted[service.key] = service
        await self._ensure_namespace(service.namespace)
        denied = await self.plane.admit_inference_service(service.manifest)
        if denied is not None:
            return failure(service, "admission", denied)
        admitted = await self.plane.admit_pod(kserve.predictor_pod(service))
        if isinstance(admitted, str):
            await self.plane.delete(ISVCS, service.namespace, service.name)
            return failure(service, "mutation", admitted)
        return await self._schedule(service, retry=False)

    async def _schedule(
        self, service: Service, *, retry: bool
    ) -> tuple[PodKey, str, planes.Obj] | Failure:
        """One kube-scheduler cycle: the pod's key, its node and the bound pod."""
        key = _pod_key(service)
        namespace, name = key.split("/", 1)
        pod = await self.plane.get(PODS, namespace, name)
        nodes = [node.name for node in self.fleet.nodes]
        result = await self.plane.schedule(pod, nodes, retry=retry)
        if isinstance(result, scheduling.Unschedulable):
            self.pending[service.key] = service
            return failure(service, "scheduling", result.message)
        if isinstance(result, scheduling.BindFailed):
            self.pending[service.key] = service
            return failure(service, "binding", result.message)
        self.pending.pop(service.key, None)
        return key, result.node, await self.plane.get(PODS, namespace, name)

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

    async def remove(self, service: Service) -> None:
        """``kubectl delete`` of the InferenceService: its pod goes, kubelet stops it."""
        key = _pod_key(service)
        namespace, name = key.split("/", 1)
        await self.plane.delete(PODS, namespace, name)
        await self.plane.delete(ISVCS, service.namespace, service.name)
        self.pending.pop(service.key, None)
        await self.nodes.stop_pod(service)

    async def settle(self, timeout: float = SETTLE_SECONDS) -> bool:
        """Wait until the extender's ledger shows every card as kubelet's IDs and NVML leave it.

        A deletion reaches the extender through its watch, and freed memory through the next node
        report: kube-scheduler retries waiting pods on such events, so the simulation waits for
        them before it does. Returns whether the ledger caught up within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.nodes.dra:  # kube-controller-manager deallocates a deleted pod's claim
            if await self.allocated_claims() <= len(self.running):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(AGENT_POLL_SECONDS / 2)
        while True:
            samples = await self.extender_samples()
            held = self.nodes.kubelet_grants()
            holders = self.nodes.allocations()
            behind = False
            for card in self.fleet.cards:
                room = card_sample(samples, ROOM, node=card.node, card=card.uuid, index=card.index)
                granted = held.get(card.uuid, 0) + holders.get(card.uuid, 0) * self.overhead_bytes
                if room is not None and room not in (0, card.model.cuda_total_bytes - granted):
                    behind = True
                    break
            if not behind:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(AGENT_POLL_SECONDS / 2)

    async def allocated_claims(self) -> int:
        """ResourceClaims that hold an allocation (the DRA backend's grants)."""
        claims = await self.plane.items(CLAIMS)
        return sum(1 for claim in claims if (claim.get("status") or {}).get("allocation"))

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
        holders = self.nodes.holders()
        allocations = self.nodes.allocations()
        held = self.nodes.kubelet_grants()
        states = []
        for node in self.fleet.nodes:
            node_gpus = self.node_gpus[node.name]
            for card in node.cards:
                granted = int(
                    held.get(card.uuid, 0)
                    if self.nodes.dra
                    else card_sample(
                        samples, GRANTED, node=node.name, card=card.uuid, index=card.index
                    )
                    or 0
                )
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
                        overhead_bytes=allocations.get(card.uuid, 0) * overhead,
                        services=tuple(sorted(holders.get(card.uuid, ()))),
                        cost=self.settings.card_cost(
                            card.model.product, card.model.cuda_total_bytes
                        ),
                    )
                )
        return states

    def kubelet_grants(self) -> dict[CardUUID, int]:
        """Bytes held on each card by the IDs kubelet handed out (the truth)."""
        return self.nodes.kubelet_grants()

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
