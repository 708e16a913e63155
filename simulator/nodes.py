"""The simulated nodes: per node a kubelet stand-in, a fake NVML file and a device-plugin process,
and what kubelet does with a bound pod (Allocate, or under the DRA backend NodePrepareResources for
its claim; the container's environment and ``$(VAR)`` expansion; a simulated vLLM start against
the node's NVML; the pod's phase) and with a deleted one. :class:`NodeBackend` puts a node on a
real card instead (the GPU proof).
"""

import contextlib
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gpushare.core import config, errors, names
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin import devices
from gpushare.deviceplugin.dra import cdi
from gpushare.simulator import apiserver, kubelet, mpsfake, processes
from gpushare.simulator import vllm as vllm_sim
from gpushare.simulator.controlplane.launch import free_port
from gpushare.simulator.drakubelet import DraKubelet
from gpushare.simulator.fleet import Node
from gpushare.simulator.gpus import NodeGpus
from gpushare.simulator.outcome import Failure, Placement
from gpushare.simulator.workload import Service

SetPhase = Callable[[str, str, str, str, str], Awaitable[None]]
"""Write a pod's status: namespace, name, phase, reason, message (kubelet's status manager)."""
GetObject = Callable[[apiserver.Resource, str, str], Awaitable[dict[str, Any]]]
"""Read an object from the API server: resource, namespace, name."""
CLAIMS: Final = apiserver.Resource("resource.k8s.io", "v1", "resourceclaims", "ResourceClaim", True)
"""Served by kube-apiserver only (the DRA backend runs on the real control plane)."""


@dataclass(frozen=True, slots=True)
class NodeBackend:
    """What each node's device plugin runs against. The default is a simulated node: its fake
    NVML file, the MPS stand-in, ``/proc`` of this host. A real card takes ``nvml="real"``,
    the real MPS control program and a ``proc_root`` where the runtime writes each container
    process's cgroup (processes on a host without containers have none of their own)."""

    nvml: str | None = None
    """``real`` or ``fake:FILE``; ``None``: the node's own fake NVML file."""
    mps_control: Path | None = None
    """The MPS control program; ``None``: the stand-in of :mod:`.mpsfake`."""
    proc_root: Path | None = None
    """Where the plugin reads ``<pid>/cgroup``; ``None``: ``/proc``."""
    mps_root: Path | None = None
    """Where each node's plugin keeps its MPS pipe directories (``<mps_root>/<node>``); ``None``:
    the node's work folder. Real MPS daemons need it short: their sockets' paths must fit in 107
    bytes."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """A pod kubelet admitted on a node: Allocate's answer and the container it starts."""

    service: Service
    pod: PodKey
    node: str
    card: CardUUID
    granted_bytes: int
    allocate_env: Mapping[str, str]
    """The environment Allocate answered (or the prepared claim's CDI spec holds)."""
    mounts: tuple[tuple[str, str], ...]
    env: Mapping[str, str]
    """The container's environment: its spec's, then Allocate's (as the runtime merges them)."""
    argv: tuple[str, ...]
    """The container's command and arguments, ``$(VAR)`` expanded by kubelet's rules."""


@dataclass(slots=True)
class Running:
    """A placed service: its pod, where it runs, and the simulated vLLM process."""

    service: Service
    pod: PodKey
    node: str
    card: CardUUID
    pid: int | None
    placement: Placement | None
    pipe: Path | None
    granted_bytes: int = 0
    claim: tuple[str, str, str] | None = None
    """Under the DRA backend: the ResourceClaim (namespace, name, uid) prepared on the node."""


@dataclass(slots=True)
class Nodes:
    """Every simulated node's kubelet and GPUs, and the services they run."""

    settings: config.Settings
    set_phase: SetPhase
    get: GetObject
    backend: NodeBackend = field(default_factory=NodeBackend)
    kubelets: dict[str, kubelet.Kubelet] = field(default_factory=dict)
    node_gpus: dict[str, NodeGpus] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)
    """Placed or start-failed services by key; they hold devices."""
    metrics_urls: dict[str, str] = field(default_factory=dict)
    """Each node's device plugin: the base URL of its ``/metrics``."""
    mps_roots: dict[str, Path] = field(default_factory=dict)
    """Each node's MPS pipe directories."""
    dra_kubelets: dict[str, DraKubelet] = field(default_factory=dict)
    """Under the DRA backend: each node's kubelet DRA manager (the device manager idles)."""
    cdi_dirs: dict[str, Path] = field(default_factory=dict)
    """Under the DRA backend: where each node's plugin writes prepared claims' CDI specs."""

    @property
    def dra(self) -> bool:
        return self.settings.backend == "dra"

    async def add(
        self,
        node: Node,
        folder: Path,
        *,
        cli: list[str],
        env: dict[str, str],
        control: Path,
        log: Path,
    ) -> processes.Part:
        """The node's fake NVML file and kubelet; returns its device-plugin process to start."""
        folder.mkdir(exist_ok=True)
        node_gpus = NodeGpus(node, folder / "nvml.json")
        node_gpus.write()
        self.node_gpus[node.name] = node_gpus
        agent = kubelet.Kubelet(node.name, folder / "kubelet", names.RESOURCE_GPU_MEMORY)
        await agent.start()
        self.kubelets[node.name] = agent
        extra_env = {}
        if self.dra:
            self.dra_kubelets[node.name] = DraKubelet(agent.kubelet_dir)
            self.cdi_dirs[node.name] = folder / "cdi"
            extra_env[f"{names.ENV_PREFIX}AGENT__CDI_SPEC_DIR"] = str(self.cdi_dirs[node.name])
        self.metrics_urls[node.name] = f"http://127.0.0.1:{free_port()}"
        root = self.backend.mps_root
        self.mps_roots[node.name] = root / node.name if root else folder / "mps"
        where = self.backend.proc_root
        return processes.Part(
            f"gpushare device-plugin ({node.name})",
            [*cli, "device-plugin", "--kubelet-dir", str(agent.kubelet_dir),
             "--nvml", self.backend.nvml or f"fake:{node_gpus.path}", "--metrics-listen",
             self.metrics_urls[node.name].removeprefix("http://"), "--node-name", node.name,
             "--mps-control", str(self.backend.mps_control or control),
             "--kubeconfig", env["KUBECONFIG"], *(["--proc-root", str(where)] if where else [])],
            env={
                **env,
                **extra_env,
                f"{names.ENV_PREFIX}AGENT__MPS_ROOT": str(self.mps_roots[node.name]),
            },
            log=log,
        )  # fmt: skip

    def listed(self) -> bool:
        """Whether every device plugin has registered and listed its IDs."""
        return all(agent.listed.is_set() and agent.devices for agent in self.kubelets.values())

    async def register_dra(self, timeout: float) -> None:
        """Each node's DRA plugin registered with its kubelet, as kubelet's plugin watcher does."""
        for dra_kubelet in self.dra_kubelets.values():
            await dra_kubelet.register(timeout)

    async def stop(self) -> None:
        for dra_kubelet in self.dra_kubelets.values():
            await dra_kubelet.close()
        for agent in self.kubelets.values():
            await agent.stop()

    async def admit(
        self, service: Service, key: PodKey, node: str, pod: Mapping[str, Any]
    ) -> Admitted | Failure:
        """kubelet's admission on ``node``: Allocate, then the container's environment and
        command line. The pod then holds its IDs until :meth:`stop_pod`."""
        if self.dra:
            return await self._admit_claim(service, key, node, pod)
        namespace, name = key.split("/", 1)
        target = gpu_container(pod)
        if target is None:
            return failure(service, "allocation", "no container requests GPU memory")
        container, units = target
        try:
            allocated = await self.kubelets[node].allocate(key, container["name"], units)
        except (errors.NoFit, errors.Conflict) as exc:
            await self.set_phase(namespace, name, "Failed", "UnexpectedAdmissionError", str(exc))
            return failure(service, "allocation", str(exc))
        card = CardUUID(devices.card_of(allocated.devices))
        pipe_text = allocated.envs.get(names.ENV_MPS_PIPE_DIRECTORY)
        pipe = Path(pipe_text) if pipe_text else None
        granted = len(allocated.devices) * self.settings.unit_bytes
        self.running[service.key] = Running(service, key, node, card, None, None, pipe, granted)
        env = vllm_sim.container_env(container, allocated.envs)
        return Admitted(
            service=service,
            pod=key,
            node=node,
            card=card,
            granted_bytes=granted,
            allocate_env=allocated.envs,
            mounts=allocated.mounts,
            env=env,
            argv=tuple(vllm_sim.argv(container, env)),
        )

    async def _admit_claim(
        self, service: Service, key: PodKey, node: str, pod: Mapping[str, Any]
    ) -> Admitted | Failure:
        """kubelet's DRA manager: NodePrepareResources for the pod's claim, then the container's
        environment from the CDI spec the plugin wrote (the runtime applies it)."""
        namespace, name = key.split("/", 1)
        statuses = (pod.get("status") or {}).get("resourceClaimStatuses") or []
        claim_name = next((s.get("resourceClaimName") for s in statuses), None)
        containers = pod.get("spec", {}).get("containers") or []
        container = next((c for c in containers if (c.get("resources") or {}).get("claims")), None)
        if claim_name is None or container is None:
            return failure(service, "allocation", "the pod names no prepared ResourceClaim")
        claim = await self.get(CLAIMS, namespace, claim_name)
        uid = str(claim["metadata"]["uid"])
        answer = await self.dra_kubelets[node].prepare(namespace, claim_name, uid)
        if answer.error:
            reason = "FailedPrepareDynamicResources"
            await self.set_phase(namespace, name, "Pending", reason, answer.error)
            return failure(service, "allocation", answer.error)
        envs, mounts = cdi.edits(self.cdi_dirs[node], uid)
        card = CardUUID(envs[names.ENV_VISIBLE_DEVICES])
        pipe_text = envs.get(names.ENV_MPS_PIPE_DIRECTORY)
        granted = int(envs[names.ENV_GRANTED_BYTES])
        self.running[service.key] = Running(
            service, key, node, card, None, None, Path(pipe_text) if pipe_text else None, granted,
            (namespace, claim_name, uid),
        )  # fmt: skip
        env = vllm_sim.container_env(container, envs)
        return Admitted(
            service=service, pod=key, node=node, card=card, granted_bytes=granted,
            allocate_env=envs, mounts=mounts, env=env, argv=tuple(vllm_sim.argv(container, env)),
        )  # fmt: skip

    async def start_pod(
        self, service: Service, key: PodKey, node: str, pod: Mapping[str, Any]
    ) -> Placement | Failure:
        """kubelet's admission (Allocate) and the container's simulated vLLM start on ``node``."""
        admitted = await self.admit(service, key, node, pod)
        if isinstance(admitted, Failure):
            return admitted
        namespace, name = key.split("/", 1)
        card, env, words = admitted.card, admitted.env, list(admitted.argv)
        running = self.running[service.key]
        pipe = running.pipe
        visible = env.get(names.ENV_VISIBLE_DEVICES, "")
        node_gpus = self.node_gpus[node]
        if visible != card:
            message = f"{names.ENV_VISIBLE_DEVICES}={visible!r}, but the IDs name {card}"
            return failure(service, "start", message)
        self._update_servers(node)  # the first client of a daemon starts its MPS server
        outcome = vllm_sim.start(
            words,
            card_free_bytes=node_gpus.free_bytes(card),
            cuda_total_bytes=node_gpus.card(card).model.cuda_total_bytes,
            limit_bytes=_limit(pipe, env, card),
            minimum_budget_bytes=service.minimum_budget_bytes,
        )
        if isinstance(outcome, vllm_sim.Refused):
            await self.set_phase(namespace, name, "Running", "CrashLoopBackOff", outcome.message)
            return failure(service, "start", outcome.message)
        running.pid = node_gpus.start(card, outcome.used_bytes)
        await self.set_phase(namespace, name, "Running", "", "")
        running.placement = Placement(
            service=service.key,
            label=service.label,
            pod=name,
            node=node,
            card_uuid=card,
            card_index=node_gpus.card(card).index,
            requested_bytes=service.requested_bytes or 0,
            granted_bytes=admitted.granted_bytes,
            utilization=str(outcome.utilization),
            used_bytes=outcome.used_bytes,
            chosen_card=str((pod["metadata"].get("annotations") or {}).get(
                names.ANNOTATION_CARD_UUID, ""
            )),
        )  # fmt: skip
        return running.placement

    async def stop_pod(self, service: Service) -> None:
        """The pod is gone: kubelet frees its IDs (or unprepares its claim); its process ends."""
        running = self.running.pop(service.key, None)
        if running is None:
            return
        if running.claim is not None:
            await self.dra_kubelets[running.node].unprepare(*running.claim)
        self.kubelets[running.node].release(running.pod)
        if running.pid is not None:
            self.node_gpus[running.node].stop(running.pid)
        self._update_servers(running.node)

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

    def holders(self) -> dict[CardUUID, list[str]]:
        """The services running on each card (started, not refused), by key."""
        out: dict[CardUUID, list[str]] = {}
        for running in self.running.values():
            if running.placement is not None:
                out.setdefault(running.card, []).append(running.service.key)
        return out

    def allocations(self) -> dict[CardUUID, int]:
        """How many pods hold IDs on each card (each costs the allocation overhead)."""
        out: dict[CardUUID, int] = {}
        for running in self.running.values():
            out[running.card] = out.get(running.card, 0) + 1
        return out

    def kubelet_grants(self) -> dict[CardUUID, int]:
        """Bytes held on each card by the IDs kubelet handed out, or the claims it prepared
        (the truth)."""
        held: dict[CardUUID, int] = {}
        for running in self.running.values():
            if running.claim is not None:
                held[running.card] = held.get(running.card, 0) + running.granted_bytes
        for agent in self.kubelets.values():
            for holdings in agent.holdings.values():
                for holding in holdings:
                    card = CardUUID(devices.card_of(holding.devices))
                    held[card] = held.get(card, 0) + len(holding.devices) * self.settings.unit_bytes
        return held


def stop_daemons(roots: Iterable[Path]) -> None:
    """End the MPS stand-ins the plugins started (each also ends on its own with us)."""
    for root in roots:
        for pid_file in root.glob(f"*/{mpsfake.PID_FILE}"):
            pid = mpsfake.daemon_pid(pid_file.parent)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)


def quit_daemon(pipe: Path, control: Path | str) -> None:
    """Ask the MPS control daemon of ``pipe`` to quit (nothing if it is gone)."""
    env = {**os.environ, names.ENV_MPS_PIPE_DIRECTORY: str(pipe)}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [str(control)],
            input="quit\n",
            text=True,
            env=env,
            capture_output=True,
            timeout=15,
            check=False,
        )


def quit_daemons(root: Path, control: Path | str) -> None:
    """Quit every MPS control daemon under ``root`` (the agent leaves them for its successor)."""
    for pipe in sorted(root.glob("*")):
        if (pipe / mpsfake.PID_FILE).exists():
            quit_daemon(pipe, control)


def failure(service: Service, stage: Any, reason: str) -> Failure:
    return Failure(service.key, service.label, service.requested_bytes, stage, reason)


def _limit(pipe: Path | None, env: Mapping[str, str], card: str) -> int | None:
    """The MPS limit the client runs under; none when no daemon serves its pipe directory."""
    if pipe is None or not mpsfake.running(pipe):
        return None
    limits = [
        limit
        for limit in (mpsfake.default_limit_bytes(pipe), vllm_sim.mps_limit_bytes(env, card))
        if limit is not None
    ]
    return min(limits, default=None)


def gpu_container(pod: Mapping[str, Any]) -> tuple[dict[str, Any], int] | None:
    """The container that requests GPU memory, and how many units."""
    for container in pod.get("spec", {}).get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(names.RESOURCE_GPU_MEMORY) or (
            resources.get("requests") or {}
        ).get(names.RESOURCE_GPU_MEMORY)
        if amount is not None:
            return container, int(str(amount))
    return None
