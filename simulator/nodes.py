"""The simulated nodes: per node a kubelet stand-in, a fake NVML file and a device-plugin process,
and what kubelet does with a bound pod (Allocate, the container's ``$(VAR)`` expansion, a simulated
vLLM start against the node's NVML, the pod's phase) and with a deleted one.
"""

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpushare.core import config, errors, names
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin import devices
from gpushare.simulator import kubelet, mpsfake, processes
from gpushare.simulator import vllm as vllm_sim
from gpushare.simulator.controlplane.launch import free_port
from gpushare.simulator.fleet import Node
from gpushare.simulator.gpus import NodeGpus
from gpushare.simulator.outcome import Failure, Placement
from gpushare.simulator.workload import Service

SetPhase = Callable[[str, str, str, str, str], Awaitable[None]]
"""Write a pod's status: namespace, name, phase, reason, message (kubelet's status manager)."""


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


@dataclass(slots=True)
class Nodes:
    """Every simulated node's kubelet and GPUs, and the services they run."""

    settings: config.Settings
    set_phase: SetPhase
    kubelets: dict[str, kubelet.Kubelet] = field(default_factory=dict)
    node_gpus: dict[str, NodeGpus] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)
    """Placed or start-failed services by key; they hold devices."""

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
        return processes.Part(
            f"gpushare device-plugin ({node.name})",
            [*cli, "device-plugin", "--kubelet-dir", str(agent.kubelet_dir),
             "--nvml", f"fake:{node_gpus.path}", "--metrics-listen",
             f"127.0.0.1:{free_port()}", "--node-name", node.name,
             "--mps-control", str(control), "--kubeconfig", env["KUBECONFIG"]],
            env={**env, f"{names.ENV_PREFIX}AGENT__MPS_ROOT": str(folder / "mps")},
            log=log,
        )  # fmt: skip

    def listed(self) -> bool:
        """Whether every device plugin has registered and listed its IDs."""
        return all(agent.listed.is_set() and agent.devices for agent in self.kubelets.values())

    async def stop(self) -> None:
        for agent in self.kubelets.values():
            await agent.stop()

    async def start_pod(
        self, service: Service, key: PodKey, node: str, pod: Mapping[str, Any]
    ) -> Placement | Failure:
        """kubelet's admission (Allocate) and the container's start on ``node``."""
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
        running = Running(service, key, node, card, None, None, pipe)
        self.running[service.key] = running
        env = vllm_sim.container_env(container, allocated.envs)
        words = vllm_sim.argv(container, env)
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
            granted_bytes=len(allocated.devices) * self.settings.unit_bytes,
            utilization=str(outcome.utilization),
            used_bytes=outcome.used_bytes,
            chosen_card=str((pod["metadata"].get("annotations") or {}).get(
                names.ANNOTATION_CARD_UUID, ""
            )),
        )  # fmt: skip
        return running.placement

    def stop_pod(self, service: Service) -> None:
        """The pod is gone: kubelet frees its IDs and its process ends."""
        running = self.running.pop(service.key, None)
        if running is None:
            return
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
        """Bytes held on each card by the IDs kubelet handed out (the truth)."""
        held: dict[CardUUID, int] = {}
        for agent in self.kubelets.values():
            for holdings in agent.holdings.values():
                for holding in holdings:
                    card = CardUUID(devices.card_of(holding.devices))
                    held[card] = held.get(card, 0) + len(holding.devices) * self.settings.unit_bytes
        return held


def stop_daemons(workdir: Path) -> None:
    """End the MPS stand-ins the plugins started (each also ends on its own with us)."""
    for pid_file in workdir.glob(f"*/mps/*/{mpsfake.PID_FILE}"):
        pid = mpsfake.daemon_pid(pid_file.parent)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)


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
