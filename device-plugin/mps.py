"""MPS isolation: the driver refuses a container's allocations past its grant.

The MPS modes and ``none``, named in configuration (``isolation``):

``mps`` (default)
    One ``nvidia-cuda-mps-control`` daemon per allocated container, with its own pipe directory
    under ``agent.mps_root``, bound to its card (``CUDA_VISIBLE_DEVICES=<uuid>``), and the grant set
    as the daemon's default (``set_default_device_pinned_mem_limit``) before its first client. A
    client can lower that limit but never raise it, so the container cannot cross its grant whatever
    its entrypoint does. Pods on different daemons time-slice the card rather than run side by side.
    The daemon starts in ``Allocate`` (or ``PreStartContainer`` if it has died) and stops once no
    pod holds its device IDs.
``mps-shared``
    One supervised daemon per node; each container's limit travels in its environment
    (``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``), which its own entrypoint could rewrite. Kernels of
    different pods run side by side.
``none``
    No MPS: grants are bookkeeping, the watchdog the only backstop.

``cgroup`` (per-cgroup driver limits, :mod:`.cgrouplimit`) needs no daemon; ``auto`` (the default)
picks it where every card supports it, else ``mps`` (:func:`make`).

Each MPS server takes card memory (``agent.mps_server_bytes``, 66 MiB measured);
:meth:`Mode.servers_on` counts them so that grants plus servers never exceed a card. Without a
running daemon the limit variable is silently ignored, so a mode whose daemon is down reports a
:meth:`Mode.down_reason` and the agent grants nothing until it is back.
"""

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from gpushare.core import errors, names
from gpushare.core.config import Isolation, IsolationSetting
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import cgrouplimit
from gpushare.deviceplugin.allocation import Grant
from gpushare.deviceplugin.nvml import Nvml

logger = logging.getLogger(__name__)

CONTROL: Final = "nvidia-cuda-mps-control"
PID_FILE: Final = "nvidia-cuda-mps-control.pid"
"""Written by the control daemon into its pipe directory."""
GRANT_FILE: Final = "gpushare-grant.json"
"""Ours: what a per-container daemon was started for, so a restarted agent adopts it."""
PROBE: Final = "probe"
"""The pipe directory of a trial daemon, started after a failed start to learn when starts work."""
_KEPT: Final = frozenset({GRANT_FILE, "log"})
"""What a daemon's restart keeps in its pipe directory (the rest is the dead daemon's)."""
SHARED: Final = "shared"
"""The pipe directory's name of the ``mps-shared`` daemon."""
LIMIT_DEVICE: Final = "0"
"""The device a per-container daemon's limit names: it sees only its own card, as ordinal 0."""
COMMAND_SECONDS: Final = 10.0
"""A control command answers in milliseconds; ten seconds means the daemon is wedged."""
START_SECONDS: Final = 5.0
"""How long a new daemon may take to write its pid file."""
RELEASE_GRACE_SECONDS: Final = 120.0
"""A daemon whose IDs no pod holds is kept this long: kubelet lists a pod's devices in its
PodResources API only after Allocate returns, and a container may still be starting."""


class MpsError(errors.Conflict):
    """An MPS daemon could not be started or configured: the grant must not go ahead."""


class Runner(Protocol):
    """Runs the MPS control program (a seam for tests, which use a recording fake)."""

    async def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None = None
    ) -> tuple[int, str]:
        """Run to completion; return the exit status and the output."""
        ...


class SubprocessRunner:
    """Runs programs with asyncio; a daemonising start (no stdin) keeps no pipe to the daemon."""

    async def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None = None
    ) -> tuple[int, str]:
        """Run ``argv`` with ``env`` added to this process's environment."""
        full_env = {**os.environ, **env}
        if stdin is None:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=full_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            return await asyncio.wait_for(proc.wait(), COMMAND_SECONDS), ""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=full_env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin.encode()), COMMAND_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"no answer within {COMMAND_SECONDS:.0f} s"
        return proc.returncode or 0, out.decode(errors="replace")


class Mode(Protocol):
    """One isolation mode."""

    name: Isolation

    async def start(self) -> None:
        """Adopt or start what the mode needs at start-up."""
        ...

    async def check(self) -> None:
        """Supervise: restart what died."""
        ...

    def down_reason(self) -> str | None:
        """Why nothing may be granted now, or ``None``."""
        ...

    def servers_on(self, card: CardUUID) -> int:
        """MPS servers counted on ``card`` now."""
        ...

    def servers_for(self, grant: Grant) -> int:
        """Servers on the grant's card once it is prepared (counts a new per-container daemon)."""
        ...

    async def prepare(self, grant: Grant) -> Path | None:
        """Make the grant's isolation ready; return the pipe directory (``None`` without MPS)."""
        ...

    async def release(self, held: Collection[str]) -> None:
        """Stop daemons whose grant key is not in ``held`` (after a grace)."""
        ...

    async def end(self, key: str) -> None:
        """Stop the grant's isolation now: no container uses it any more (an unprepared claim)."""
        ...


class Off:
    """``none``: no MPS."""

    name: Isolation = "none"

    async def start(self) -> None:
        """Nothing to start."""

    async def check(self) -> None:
        """Nothing to supervise."""

    def down_reason(self) -> str | None:
        """Never down."""
        return None

    def servers_on(self, card: CardUUID) -> int:
        """No servers."""
        return 0

    def servers_for(self, grant: Grant) -> int:
        """No servers."""
        return 0

    async def prepare(self, grant: Grant) -> Path | None:
        """No pipe directory."""
        return None

    async def release(self, held: Collection[str]) -> None:
        """Nothing to release."""

    async def end(self, key: str) -> None:
        """Nothing to stop."""


@dataclass(frozen=True)
class Daemon:
    """A running control daemon."""

    pipe_directory: Path
    grant: Grant | None
    started: float


class _Control:
    """Starting, commanding and stopping control daemons."""

    def __init__(self, runner: Runner, control: str, cgroup: Path | None) -> None:
        self.runner = runner
        self.control = control
        self.cgroup = cgroup

    def available(self) -> str | None:
        if shutil.which(self.control) is None:
            return (
                f"MPS control program {self.control!r} not found: install the NVIDIA MPS binaries"
                " on the node or set isolation: none"
            )
        return None

    @staticmethod
    def env(pipe: Path, card: CardUUID | None) -> dict[str, str]:
        env = {
            names.ENV_MPS_PIPE_DIRECTORY: str(pipe),
            names.ENV_MPS_LOG_DIRECTORY: str(pipe / "log"),
        }
        if card is not None:
            env[names.ENV_CUDA_VISIBLE_DEVICES] = card
        return env

    async def launch(self, pipe: Path, card: CardUUID | None) -> None:
        """Start a daemon in ``pipe``, keeping the folder itself (containers mount its inode)."""
        (pipe / "log").mkdir(parents=True, exist_ok=True)
        pipe.chmod(0o755)
        for stale in pipe.iterdir():
            if stale.name in _KEPT:
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        try:
            rc, _ = await self.runner.run([self.control, "-d"], env=self.env(pipe, card))
        except (OSError, TimeoutError) as exc:
            raise MpsError(f"cannot start {self.control} in {pipe}: {exc}") from exc
        if rc != 0:
            raise MpsError(f"{self.control} -d in {pipe} exited with status {rc}")
        deadline = time.monotonic() + START_SECONDS
        while not alive(pipe):
            if time.monotonic() > deadline:
                raise MpsError(
                    f"{self.control} in {pipe} wrote no live pid within {START_SECONDS:.0f} s"
                )
            await asyncio.sleep(0.05)
        if self.cgroup is not None:
            self.adopt_into_cgroup(pipe)

    def adopt_into_cgroup(self, pipe: Path) -> None:
        """Move the daemon out of the agent's container into :attr:`cgroup` (cgroup v2).

        The container runtime kills every process of a container's cgroup when its pod goes (the
        agent shares the host's PID namespace, so nothing else would end them); a daemon moved out
        outlives the agent's pod, and its MPS servers, forked later, start in its cgroup.
        """
        assert self.cgroup is not None
        try:
            if not (self.cgroup.parent / "cgroup.controllers").exists():
                raise OSError(f"{self.cgroup.parent} is not a cgroup v2 hierarchy")
            self.cgroup.mkdir(exist_ok=True)
            pid = (pipe / PID_FILE).read_text().strip()
            with (self.cgroup / "cgroup.procs").open("a") as procs:
                procs.write(f"{pid}\n")
        except OSError as exc:
            logger.error(
                "MPS daemon of %s stays in the agent's cgroup and ends with its pod: %s", pipe, exc
            )

    async def command(self, pipe: Path, card: CardUUID | None, line: str) -> None:
        try:
            rc, out = await self.runner.run(
                [self.control], env=self.env(pipe, card), stdin=line + "\n"
            )
        except (OSError, TimeoutError) as exc:
            raise MpsError(f"MPS command {line!r} in {pipe} failed: {exc}") from exc
        if rc != 0:
            raise MpsError(f"MPS command {line!r} in {pipe} failed (status {rc}): {out.strip()}")

    async def quit(self, pipe: Path) -> None:
        if alive(pipe):
            try:
                await self.command(pipe, None, "quit")
            except MpsError as exc:
                logger.warning("%s", exc)


def alive(pipe: Path) -> bool:
    """Whether the daemon of ``pipe`` runs (its pid file names a live process, not a zombie)."""
    try:
        pid = int((pipe / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return False
    return running(pid)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (it exists and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class PerContainer:
    """``mps``: a daemon per allocated container, its grant the daemon's default limit."""

    name: Isolation = "mps"

    def __init__(
        self,
        root: Path,
        *,
        runner: Runner,
        control: str = CONTROL,
        cgroup: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._control = _Control(runner, control, cgroup)
        self._clock = clock
        self._daemons: dict[str, Daemon] = {}
        self._failed: tuple[CardUUID, str] | None = None
        """The card of the last daemon that would not start, and why (cleared by one that does)."""
        self._changing = asyncio.Lock()
        """One daemon change at a time: the poll's restart of a dead daemon and kubelet's
        PreStartContainer for it would otherwise both restart it."""

    async def start(self) -> None:
        """Adopt the daemons a previous agent left (their pods still use them)."""
        self._root.mkdir(parents=True, exist_ok=True)
        for pipe in sorted(self._root.iterdir()):
            grant = _read_grant(pipe)
            if grant is None:
                continue
            # A dead one too: its container may still mount the folder; check() restarts it there,
            # and release() stops it if no pod holds its IDs any more.
            self._daemons[grant.key] = Daemon(pipe, grant, self._clock())
            logger.info("adopted MPS daemon %s (%s)", pipe, grant.card)

    async def check(self) -> None:
        """Restart any daemon that died, in its own pipe directory and with its grant as before;
        after a failed start, try a trial daemon until one starts again."""
        async with self._changing:
            await self._restart_dead()

    async def _restart_dead(self) -> None:
        for daemon in list(self._daemons.values()):
            if alive(daemon.pipe_directory) or daemon.grant is None:
                continue
            logger.error("MPS daemon %s died; restarting it", daemon.pipe_directory)
            try:
                await self._launch(daemon.pipe_directory, daemon.grant)
            except MpsError as exc:
                logger.error("%s", exc)
        if self._failed is not None:
            await self._trial(self._failed[0])

    async def _trial(self, card: CardUUID) -> None:
        pipe = self._root / PROBE
        try:
            await self._control.launch(pipe, card)
        except MpsError as exc:
            self._failed = (card, str(exc))
        else:
            logger.info("MPS daemons start again (trial daemon on %s)", card)
            self._failed = None
        finally:
            await self._control.quit(pipe)
            shutil.rmtree(pipe, ignore_errors=True)

    def down_reason(self) -> str | None:
        """Down when the control program is missing, or the last daemon start failed."""
        missing = self._control.available()
        if missing is not None or self._failed is None:
            return missing
        card, why = self._failed
        return f"an MPS daemon for card {card} would not start: {why}"

    def servers_on(self, card: CardUUID) -> int:
        """One server per daemon on the card."""
        return sum(
            1 for d in self._daemons.values() if d.grant is not None and d.grant.card == card
        )

    def servers_for(self, grant: Grant) -> int:
        """The card's servers once the grant's daemon runs (daemons it replaces not counted)."""
        ids = set(grant.devices)
        return 1 + sum(
            1
            for key, d in self._daemons.items()
            if d.grant is not None
            and d.grant.card == grant.card
            and key != grant.key
            and not ids & set(d.grant.devices)
        )

    async def prepare(self, grant: Grant) -> Path:
        """Start the grant's daemon (or keep the live one) with the grant as its default limit."""
        async with self._changing:
            return await self._prepare(grant)

    async def _prepare(self, grant: Grant) -> Path:
        existing = self._daemons.get(grant.key)
        if existing is not None and alive(existing.pipe_directory):
            return existing.pipe_directory
        if grant.compute_share is None and existing is not None and existing.grant is not None:
            # A restart before the container starts (PreStartContainer names IDs only).
            grant = dataclasses.replace(grant, compute_share=existing.grant.compute_share)
        ids = set(grant.devices)
        for key, other in list(self._daemons.items()):
            if key != grant.key and other.grant is not None and ids & set(other.grant.devices):
                await self._stop(key, "kubelet handed its devices to a new container")
        pipe = self._root / grant.key
        try:
            await self._launch(pipe, grant)
        except MpsError:
            if existing is None:
                shutil.rmtree(pipe, ignore_errors=True)
            raise
        self._daemons[grant.key] = Daemon(pipe, grant, self._clock())
        return pipe

    async def _launch(self, pipe: Path, grant: Grant) -> None:
        """(Re)start the daemon of ``pipe`` in place, its limit set before any client."""
        await self._control.quit(pipe)
        try:
            await self._control.launch(pipe, grant.card)
            # Before the first client: the server takes the default when it starts.
            await self._control.command(
                pipe,
                grant.card,
                f"set_default_device_pinned_mem_limit {LIMIT_DEVICE} {grant.limit_mib}M",
            )
            if grant.compute_share is not None:
                # A ceiling: a client's own CUDA_MPS_ACTIVE_THREAD_PERCENTAGE can only lower it.
                await self._control.command(
                    pipe, grant.card, f"set_default_active_thread_percentage {grant.compute_share}"
                )
        except MpsError as exc:
            await self._control.quit(pipe)
            self._failed = (grant.card, str(exc))
            raise
        _write_grant(pipe, grant)
        self._failed = None
        logger.info("MPS daemon %s started for %s, limit %d MiB", pipe, grant.card, grant.limit_mib)

    async def release(self, held: Collection[str]) -> None:
        """Stop daemons that no pod holds any more, once past the grace."""
        async with self._changing:
            now = self._clock()
            for key, daemon in list(self._daemons.items()):
                if key not in held and now - daemon.started > RELEASE_GRACE_SECONDS:
                    await self._stop(key, "no pod holds its devices")

    async def end(self, key: str) -> None:
        """Stop the grant's daemon now (none: nothing to do)."""
        async with self._changing:
            if key in self._daemons:
                await self._stop(key, "its claim was unprepared")

    async def _stop(self, key: str, why: str) -> None:
        daemon = self._daemons.pop(key)
        await self._control.quit(daemon.pipe_directory)
        shutil.rmtree(daemon.pipe_directory, ignore_errors=True)
        logger.info("MPS daemon %s stopped: %s", daemon.pipe_directory, why)


class Shared:
    """``mps-shared``: one supervised daemon per node, limits in the container's environment."""

    name: Isolation = "mps-shared"

    def __init__(
        self, root: Path, *, runner: Runner, control: str = CONTROL, cgroup: Path | None = None
    ) -> None:
        self._pipe = root / SHARED
        self._control = _Control(runner, control, cgroup)
        self._down: str | None = "shared MPS daemon not started yet"

    @property
    def pipe_directory(self) -> Path:
        """The daemon's pipe directory."""
        return self._pipe

    async def start(self) -> None:
        """Start (or adopt) the daemon."""
        await self.check()

    async def check(self) -> None:
        """Restart the daemon if it is not running; grant nothing while it is down."""
        missing = self._control.available()
        if missing is not None:
            self._down = missing
            return
        if alive(self._pipe):
            self._down = None
            return
        if self._down is None:
            logger.error("shared MPS daemon in %s is down; restarting it", self._pipe)
        try:
            self._pipe.mkdir(parents=True, exist_ok=True)
            await self._control.launch(self._pipe, None)
        except MpsError as exc:
            self._down = f"shared MPS daemon is down: {exc}"
            logger.error("%s", self._down)
            return
        self._down = None
        logger.info("shared MPS daemon running in %s", self._pipe)

    def down_reason(self) -> str | None:
        """Why the daemon is not serving, or ``None``."""
        if self._down is None and not alive(self._pipe):
            self._down = "shared MPS daemon is down"
        return self._down

    def servers_on(self, card: CardUUID) -> int:
        """One server serves every card."""
        return 1

    def servers_for(self, grant: Grant) -> int:
        """One server serves every card."""
        return 1

    async def prepare(self, grant: Grant) -> Path:
        """The shared pipe directory, if its daemon runs."""
        reason = self.down_reason()
        if reason is not None:
            raise MpsError(reason)
        return self._pipe

    async def release(self, held: Collection[str]) -> None:
        """The shared daemon stays."""

    async def end(self, key: str) -> None:
        """The shared daemon stays."""


def make(
    isolation: IsolationSetting,
    root: Path,
    *,
    runner: Runner | None = None,
    control: str = CONTROL,
    cgroup: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    nvml: Nvml | None = None,
    cgroup_v2: bool | None = None,
) -> Mode:
    """The mode named ``isolation``; under ``auto`` the strongest that ``nvml``'s cards support.

    With ``cgroup``, MPS daemons are moved there (see :meth:`_Control.adopt_into_cgroup`) so that
    they outlive the agent's pod.

    ``cgroup_v2`` says whether the node runs cgroup v2 (default: look at ``/sys/fs/cgroup``).
    Without ``nvml`` no card is known to support per-cgroup limits.
    """
    reason: str | None = "no NVML to ask"
    if nvml is not None and isolation in ("auto", "cgroup"):
        v2 = cgrouplimit.cgroup_v2() if cgroup_v2 is None else cgroup_v2
        reason = cgrouplimit.unsupported(nvml.snapshot().cards, cgroup_v2=v2)
    chosen = cgrouplimit.choose(isolation, reason=reason)
    if isolation == "auto":
        logger.info("isolation auto: %s%s", chosen, f" ({reason})" if reason else "")
    runner = runner or SubprocessRunner()
    if chosen == "cgroup":
        if nvml is None:
            raise errors.ConfigError("isolation 'cgroup' needs NVML to set and check its limits")
        return cgrouplimit.CgroupLimit(nvml, reason=reason)
    if chosen == "mps":
        return PerContainer(root, runner=runner, control=control, cgroup=cgroup, clock=clock)
    if chosen == "mps-shared":
        return Shared(root, runner=runner, control=control, cgroup=cgroup)
    return Off()


def _write_grant(pipe: Path, grant: Grant) -> None:
    data = {
        "card": grant.card,
        "devices": list(grant.devices),
        "granted_bytes": grant.granted_bytes,
        "compute_share": grant.compute_share,
    }
    (pipe / GRANT_FILE).write_text(json.dumps(data))


def _read_grant(pipe: Path) -> Grant | None:
    try:
        data = json.loads((pipe / GRANT_FILE).read_text())
        return Grant(
            card=CardUUID(data["card"]),
            devices=tuple(data["devices"]),
            granted_bytes=int(data["granted_bytes"]),
            compute_share=None if data.get("compute_share") is None else int(data["compute_share"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
