"""``cgroup`` isolation: the driver's per-cgroup memory limit (drivers r615 and later).

Where the driver has ``nvmlDeviceSetMemoryLimits_v1`` (NVML reports it per card: missing on older
drivers and in MIG mode) and the node runs cgroup v2, a container's grant is a hard and soft limit
on its cgroup: it covers every process of the container, nothing inside can change it, and CUDA
reports it as the device's total. Two paths set it:

- NVIDIA's container toolkit (1.20.1 and later) applies it before the container's process starts,
  from its CDI ``createRuntime`` hook ``apply-cuda-memory-limits``, which reads
  ``NVIDIA_GPU_MEMORY_REQUEST`` / ``NVIDIA_GPU_MEMORY_LIMIT`` (MiB) from the container's
  environment: ``Allocate`` sets both to the grant and names the card as a CDI device.
- The agent sets the same limit through NVML on the cgroup of every process of a granted container
  it sees on the card, once per cgroup: where the toolkit lacks the hook, a container is limited
  from the first poll that sees it (up to ``agent.poll_seconds`` late); where the hook ran, the call
  repeats the same values.

This mode is built to NVIDIA's documentation and nvidia-ml-py 13.615's definitions; it has not run
on a driver that has the call (see docs/isolation.md).
"""

import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Final

from gpushare.core.config import Isolation, IsolationSetting
from gpushare.core.ids import CardUUID, PodKey
from gpushare.deviceplugin.allocation import Grant
from gpushare.deviceplugin.nvml import CardReading, LimitError, Nvml, ProcessUsage
from gpushare.deviceplugin.watchdog import ProcessLocator

logger = logging.getLogger(__name__)

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
"""Where the unified (v2) hierarchy is mounted; ``cgroup.controllers`` exists only under v2."""


def cgroup_v2(root: Path = CGROUP_ROOT) -> bool:
    """Whether the node runs the unified cgroup hierarchy the limits need."""
    return (root / "cgroup.controllers").is_file()


def unsupported(cards: Iterable[CardReading], *, cgroup_v2: bool) -> str | None:
    """Why per-cgroup limits cannot hold this node's containers, or ``None`` when they can."""
    readable = [card for card in cards if card.error is None]
    if not readable:
        return "NVML lists no card to read"
    lacking = sorted(card.uuid for card in readable if not card.memory_limits)
    if lacking:
        return (
            f"the driver has no per-cgroup memory limits on {', '.join(lacking)}"
            " (nvmlDeviceSetMemoryLimits_v1 needs driver r615+, nvidia-ml-py 13.615+, no MIG)"
        )
    if not cgroup_v2:
        return "the node does not run cgroup v2, which per-cgroup GPU memory limits need"
    return None


def choose(setting: IsolationSetting, *, reason: str | None) -> Isolation:
    """The isolation to run: the setting, or under ``auto`` the strongest the node supports.

    ``auto`` never falls to ``none``: without per-cgroup limits it picks ``mps``, which grants
    nothing while its control program is missing rather than grant without a limit.
    """
    if setting != "auto":
        return setting
    return "cgroup" if reason is None else "mps"


class CgroupLimit:
    """``cgroup``: no daemon; limits set by the toolkit's hook and, as a backstop, by the agent."""

    name: Isolation = "cgroup"

    def __init__(self, nvml: Nvml, *, reason: str | None) -> None:
        self._nvml = nvml
        self._reason = reason
        self._limited: dict[tuple[CardUUID, str], int] = {}

    async def start(self) -> None:
        """Nothing to start."""

    async def check(self) -> None:
        """Nothing to supervise."""

    def down_reason(self) -> str | None:
        """Why this node cannot limit memory by cgroup (then nothing is granted), or ``None``."""
        return self._reason

    def servers_on(self, card: CardUUID) -> int:
        """No MPS servers."""
        return 0

    def servers_for(self, grant: Grant) -> int:
        """No MPS servers."""
        return 0

    async def prepare(self, grant: Grant) -> None:
        """No pipe directory: the limit travels in the container's environment."""
        return None

    async def release(self, held: Collection[str]) -> None:
        """Nothing to release."""

    async def end(self, key: str) -> None:
        """No daemon to stop."""

    @property
    def limited(self) -> Mapping[tuple[CardUUID, str], int]:
        """The limits the agent has set: (card, cgroup) to bytes."""
        return self._limited

    def enforce(
        self,
        processes: Iterable[ProcessUsage],
        *,
        locator: ProcessLocator,
        grants: Mapping[tuple[PodKey, str], tuple[CardUUID, int]],
        containers: Mapping[tuple[str, str], tuple[PodKey, str]],
    ) -> list[tuple[CardUUID, str, int]]:
        """Limit the cgroup of each process of a granted container; returns the limits set now.

        ``containers`` maps (pod UID, container runtime ID) to (pod key, container name).
        """
        done = []
        seen = set()
        for process in processes:
            where = locator.locate(process.pid)
            if where is None or not where.cgroup:
                continue
            owner = containers.get((where.pod_uid, where.container_id))
            card, granted = grants.get(owner, (CardUUID(""), 0)) if owner else (CardUUID(""), 0)
            if not granted or card != process.card:
                continue
            key = (card, where.cgroup)
            seen.add(key)
            if self._limited.get(key) == granted:
                continue
            try:
                self._nvml.set_memory_limit(
                    card, where.cgroup, soft_bytes=granted, hard_bytes=granted
                )
            except LimitError as exc:
                logger.error("%s", exc)
                continue
            self._limited[key] = granted
            done.append((card, where.cgroup, granted))
            logger.info("limited cgroup %s to %d bytes on card %s", where.cgroup, granted, card)
        # A cgroup whose processes are gone needs no memory of it: a new one is limited again.
        self._limited = {k: v for k, v in self._limited.items() if k in seen}
        return done
