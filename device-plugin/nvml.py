"""NVML behind one interface: the real library (nvidia-ml-py) and a fake described in a file.

:class:`Nvml` is what the agent reads. Neither backend raises for a broken card: NVML's errors stop
here and come back as a reading with ``error`` set (the card is then unhealthy) or as a snapshot
with ``error`` set (no driver), so the agent logs them and keeps going instead of crash-looping.

The fake (:class:`FakeNvml`) reads a YAML or JSON file of cards, processes and XID events and reads
it again whenever it changes, so a test or the simulator scripts usage and faults by rewriting it::

    cards:
    - {uuid: GPU-0a..., index: 0, model: NVIDIA H100 80GB HBM3, total: 81559Mi, reserved: 480Mi}
    - {uuid: GPU-1b..., index: 1, model: NVIDIA H100 80GB HBM3, total: 81559Mi,
       error: "GPU is lost"}            # NVML fails on this card
    - {uuid: GPU-2c..., index: 2, total: 81559Mi, memory_limits: true}   # a driver of r615+
    processes:
    - {pid: 4242, card: GPU-0a..., used: 20Gi, kind: mps-client}
    - {pid: 4243, card: GPU-0a..., used: 66Mi, kind: mps-server}
    - {pid: 4244, card: GPU-0a..., used: 2Gi, kind: cuda}   # a context outside MPS
    xid:                                # each delivered once, in order
    - {card: GPU-0a..., xid: 79}
"""

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

import pydantic
import yaml

from gpushare.core import config, errors
from gpushare.core.ids import CardUUID

logger = logging.getLogger(__name__)

APPLICATION_XIDS: Final = frozenset({13, 31, 43, 45, 68, 109})
"""XIDs caused by an application (its own page fault, its context timing out), not by the card:
they leave the card healthy, as NVIDIA's device plugin also decides."""

FILE_CHECK_SECONDS: Final = 0.1
"""How often a waiting fake looks at its file: fast enough for tests, cheap for one stat call."""
MPS_SERVER: Final = "nvidia-cuda-mps-server"
"""The process name of an MPS server (each control daemon starts one per card it serves)."""
SET_MEMORY_LIMITS: Final = "nvmlDeviceSetMemoryLimits_v1"
"""The per-cgroup limit call of drivers r615 and later (nvidia-ml-py 13.615); absent before."""

ProcessKind = Literal["cuda", "mps-client", "mps-server", "unknown"]
"""How a process holds the card: a plain CUDA context (outside MPS), a client of an MPS server, an
MPS server itself, or ``unknown`` where NVML does not list MPS clients apart."""


class LimitError(errors.Conflict):
    """NVML refused a per-cgroup memory limit (or the driver has none)."""


@dataclass(frozen=True)
class CardReading:
    """One card at one moment. ``error`` set means NVML could not read it: the card is unhealthy."""

    uuid: CardUUID
    index: int
    model: str
    total_bytes: int
    reserved_bytes: int
    used_bytes: int
    free_bytes: int
    utilization: float | None = None
    """Fraction of the last sample period in which a kernel ran (0..1); ``None`` if unknown."""
    error: str | None = None
    memory_limits: bool = False
    """The driver holds per-cgroup memory limits on this card (r615+, not in MIG mode)."""

    @property
    def cuda_total_bytes(self) -> int:
        """The total CUDA and vLLM see: NVML total less the driver's reserved part."""
        return self.total_bytes - self.reserved_bytes


@dataclass(frozen=True)
class ProcessUsage:
    """A process holding memory on a card."""

    pid: int
    card: CardUUID
    used_bytes: int
    kind: ProcessKind = "unknown"


@dataclass(frozen=True)
class XidEvent:
    """A critical error NVML reported for a card."""

    card: CardUUID
    xid: int


@dataclass(frozen=True)
class Snapshot:
    """Every card and GPU process; ``error`` says why there are none (no driver, no library)."""

    cards: tuple[CardReading, ...]
    processes: tuple[ProcessUsage, ...] = ()
    error: str | None = None


class Nvml(Protocol):
    """What the agent needs from NVML."""

    def snapshot(self) -> Snapshot:
        """Read every card and process now; never raises for an NVML error."""
        ...

    def wait_events(self, timeout_seconds: float) -> list[XidEvent]:
        """Block up to ``timeout_seconds`` for critical XID events; ``[]`` where unsupported."""
        ...

    def set_memory_limit(
        self, card: CardUUID, namespace: str, *, soft_bytes: int, hard_bytes: int
    ) -> None:
        """Limit the cgroup ``namespace`` on ``card``; raises :class:`LimitError` if refused."""
        ...

    def close(self) -> None:
        """Release the library."""
        ...


# --- The real library ------------------------------------------------------------------------


class RealNvml:
    """nvidia-ml-py. Initialises lazily and again after a failure, so a late driver is picked up."""

    def __init__(self) -> None:
        import pynvml  # noqa: PLC0415 - only the real backend needs the library

        self._nvml: Any = pynvml
        self._lock = threading.Lock()
        self._handles: list[tuple[Any, CardUUID, int, str]] = []
        self._events: Any = None
        self._ready = False
        self._limits = False
        self._no_mps_list: set[CardUUID] = set()

    def _init(self) -> None:
        nvml = self._nvml
        nvml.nvmlInit()
        handles = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = CardUUID(_text(nvml.nvmlDeviceGetUUID(handle)))
            handles.append((handle, uuid, index, _text(nvml.nvmlDeviceGetName(handle))))
        self._handles = handles
        self._ready = True
        self._events = self._register_events()
        self._limits = self._has_memory_limits()

    def _has_memory_limits(self) -> bool:
        """Whether both nvidia-ml-py and the driver's library have the per-cgroup limit call."""
        nvml = self._nvml
        if not hasattr(nvml, SET_MEMORY_LIMITS):
            return False
        try:
            nvml._nvmlGetFunctionPointer(SET_MEMORY_LIMITS)  # how pynvml itself finds a symbol
        except nvml.NVMLError:
            return False
        return True

    def _in_mig_mode(self, handle: Any) -> bool:
        nvml = self._nvml
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return False
        return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)

    def _register_events(self) -> Any:
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            logger.warning("NVML events unavailable (%s): card health comes from polling only", exc)
            return None
        for handle, uuid, _, _ in self._handles:
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
            except nvml.NVMLError as exc:
                logger.warning("card %s: XID events unavailable (%s); polling only", uuid, exc)
        return events

    def snapshot(self) -> Snapshot:
        """Read every card; a card that fails is returned with its error."""
        nvml = self._nvml
        with self._lock:
            if not self._ready:
                try:
                    self._init()
                except nvml.NVMLError as exc:
                    return Snapshot(cards=(), error=f"NVML cannot start: {exc}")
            cards: list[CardReading] = []
            processes: list[ProcessUsage] = []
            for handle, uuid, index, model in self._handles:
                try:
                    cards.append(self._read_card(handle, uuid, index, model))
                except nvml.NVMLError as exc:
                    cards.append(CardReading(uuid, index, model, 0, 0, 0, 0, error=str(exc)))
                    continue
                processes.extend(self._read_processes(handle, uuid))
            return Snapshot(cards=tuple(cards), processes=tuple(processes))

    def _read_card(self, handle: Any, uuid: CardUUID, index: int, model: str) -> CardReading:
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            reserved = int(memory.reserved)
        except nvml.NVMLError_NotSupported:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reserved = 0
        try:
            utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        except nvml.NVMLError_NotSupported:
            utilization = None
        return CardReading(
            uuid=uuid,
            index=index,
            model=model,
            total_bytes=int(memory.total),
            reserved_bytes=reserved,
            used_bytes=int(memory.used),
            free_bytes=int(memory.free),
            utilization=utilization,
            # NVIDIA: per-cgroup limits do not apply to MIG.
            memory_limits=self._limits and not self._in_mig_mode(handle),
        )

    def _read_processes(self, handle: Any, uuid: CardUUID) -> list[ProcessUsage]:
        nvml = self._nvml
        try:
            running = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError as exc:
            logger.warning("card %s: cannot list processes: %s", uuid, exc)
            return []
        try:
            clients = list(nvml.nvmlDeviceGetMPSComputeRunningProcesses(handle))
        except (nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError)) as exc:
            if uuid not in self._no_mps_list:
                self._no_mps_list.add(uuid)
                logger.warning(
                    "card %s: NVML lists no MPS clients apart (%s): a CUDA context outside MPS"
                    " cannot be told from an MPS client there",
                    uuid,
                    exc,
                )
            clients = None
        mps = {int(p.pid) for p in clients or []}
        listed = {int(p.pid) for p in running}
        running.extend(p for p in clients or [] if int(p.pid) not in listed)
        result = []
        for p in running:
            pid = int(p.pid)
            kind: ProcessKind
            if self._process_name(pid).rsplit("/", 1)[-1] == MPS_SERVER:
                kind = "mps-server"
            elif pid in mps:
                kind = "mps-client"
            else:
                kind = "cuda" if clients is not None else "unknown"
            # usedGpuMemory is None where the driver withholds it (no permission, some vGPU setups).
            result.append(ProcessUsage(pid, uuid, int(p.usedGpuMemory or 0), kind))
        return result

    def _process_name(self, pid: int) -> str:
        nvml = self._nvml
        try:
            return _text(nvml.nvmlSystemGetProcessName(pid))
        except nvml.NVMLError:
            return ""  # the process ended between the two calls

    def set_memory_limit(
        self, card: CardUUID, namespace: str, *, soft_bytes: int, hard_bytes: int
    ) -> None:
        """``nvmlDeviceSetMemoryLimits_v1`` on the card for the cgroup ``namespace``."""
        nvml = self._nvml
        with self._lock:
            handle = next((h for h, uuid, _, _ in self._handles if uuid == card), None)
            if handle is None or not self._limits:
                raise LimitError(f"card {card}: the driver has no per-cgroup memory limits")
            limits = nvml.c_nvmlSetMemoryLimits_v1_t()
            limits.nameSpace = namespace.encode()
            limits.softLimit = soft_bytes
            limits.hardLimit = hard_bytes
            try:
                nvml.nvmlDeviceSetMemoryLimits_v1(handle, limits)
            except nvml.NVMLError as exc:
                raise LimitError(f"card {card}: cannot limit cgroup {namespace}: {exc}") from exc

    def wait_events(self, timeout_seconds: float) -> list[XidEvent]:
        """Wait for XID events; returns ``[]`` on timeout or where events are unsupported."""
        nvml = self._nvml
        events = self._events
        if events is None:
            threading.Event().wait(timeout_seconds)
            return []
        try:
            data = nvml.nvmlEventSetWait_v2(events, int(timeout_seconds * 1000))
        except nvml.NVMLError_Timeout:
            return []
        except nvml.NVMLError as exc:
            logger.warning("NVML event wait failed: %s", exc)
            threading.Event().wait(timeout_seconds)
            return []
        uuid = CardUUID(_text(nvml.nvmlDeviceGetUUID(data.device)))
        return [XidEvent(card=uuid, xid=int(data.eventData))]

    def close(self) -> None:
        """Shut NVML down."""
        nvml = self._nvml
        with self._lock:
            if not self._ready:
                return
            try:
                if self._events is not None:
                    nvml.nvmlEventSetFree(self._events)
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.debug("NVML shutdown: %s", exc)
            self._ready = False


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- The fake --------------------------------------------------------------------------------


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


Bytes = config.ByteSize


class FakeCard(_Strict):
    """A card of the fake file."""

    uuid: CardUUID
    index: Annotated[int, pydantic.Field(ge=0)]
    model: str = "NVIDIA H100 80GB HBM3"
    total: Bytes
    reserved: Bytes = 0
    used: Bytes = 0
    """Memory in use besides the listed processes (the driver's, an MPS server's)."""
    utilization: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.0
    error: str | None = None
    memory_limits: bool = False
    """The card's driver has per-cgroup memory limits."""


class FakeProcess(_Strict):
    """A process of the fake file."""

    pid: Annotated[int, pydantic.Field(gt=0)]
    card: CardUUID
    used: Bytes
    kind: ProcessKind = "unknown"


class FakeXid(_Strict):
    """An XID event of the fake file."""

    card: CardUUID
    xid: int


class FakeState(_Strict):
    """The whole fake file."""

    cards: tuple[FakeCard, ...] = ()
    processes: tuple[FakeProcess, ...] = ()
    xid: tuple[FakeXid, ...] = ()
    error: str | None = None
    """NVML as a whole fails (no driver)."""

    @pydantic.model_validator(mode="after")
    def _known_cards(self) -> "FakeState":
        uuids = {card.uuid for card in self.cards}
        if len(uuids) != len(self.cards):
            raise ValueError("two cards share a UUID")
        for card in [p.card for p in self.processes] + [x.card for x in self.xid]:
            if card not in uuids:
                raise ValueError(f"{card!r} is not one of the cards ({', '.join(sorted(uuids))})")
        return self


def load_fake(path: Path) -> FakeState:
    """Parse a fake NVML file; a bad file raises :class:`ConfigError` naming the problem."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise errors.ConfigError(f"cannot read fake NVML file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"fake NVML file {path} is not YAML or JSON: {exc}") from exc
    try:
        return FakeState.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'file'}: {e['msg']}".replace(
                "Extra inputs are not permitted", "unknown key"
            ).replace("Value error, ", "")
            for e in exc.errors()
        )
        raise errors.ConfigError(f"fake NVML file {path}: {problems}") from exc


class FakeNvml:
    """NVML from a :class:`FakeState`, set directly or read from a file whenever it changes."""

    def __init__(self, state: FakeState | None = None, *, path: Path | None = None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._state = state or FakeState()
        self._delivered = 0
        self._closed = False
        self._changed = threading.Condition()
        self.limits: dict[tuple[CardUUID, str], tuple[int, int]] = {}
        """Per-cgroup limits set: (card, cgroup) to (soft, hard) bytes."""
        if path is not None:
            self._reload()

    @property
    def state(self) -> FakeState:
        """The state now (after reading the file if it changed)."""
        self._reload()
        return self._state

    def set_state(self, state: FakeState) -> None:
        """Replace the whole state (used by in-process drivers such as the simulator)."""
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            stat = self._path.stat()
        except OSError as exc:
            raise errors.ConfigError(
                f"cannot read fake NVML file {self._path}: {exc.strerror}"
            ) from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            state = load_fake(self._path)
        except errors.ConfigError as exc:
            if self._stamp is None:
                raise
            logger.error("%s; keeping the previous state", exc)  # a half-written file
            return
        self._stamp = stamp
        self.set_state(state)

    def snapshot(self) -> Snapshot:
        """The state's cards and processes, with NVML's arithmetic (used includes processes)."""
        state = self.state
        if state.error is not None:
            return Snapshot(cards=(), error=f"NVML cannot start: {state.error}")
        by_card: dict[CardUUID, int] = {}
        for process in state.processes:
            by_card[process.card] = by_card.get(process.card, 0) + process.used
        cards = []
        for card in state.cards:
            if card.error is not None:
                cards.append(
                    CardReading(card.uuid, card.index, card.model, 0, 0, 0, 0, error=card.error)
                )
                continue
            used = min(card.used + by_card.get(card.uuid, 0), card.total - card.reserved)
            cards.append(
                CardReading(
                    uuid=card.uuid,
                    index=card.index,
                    model=card.model,
                    total_bytes=card.total,
                    reserved_bytes=card.reserved,
                    used_bytes=used,
                    free_bytes=card.total - card.reserved - used,
                    utilization=card.utilization,
                    memory_limits=card.memory_limits,
                )
            )
        broken = {card.uuid for card in state.cards if card.error is not None}
        processes = tuple(
            ProcessUsage(p.pid, p.card, p.used, p.kind)
            for p in state.processes
            if p.card not in broken
        )
        return Snapshot(cards=tuple(cards), processes=processes)

    def set_memory_limit(
        self, card: CardUUID, namespace: str, *, soft_bytes: int, hard_bytes: int
    ) -> None:
        """Record the limit where the card supports limits, as the real call would set it."""
        found = next((c for c in self.state.cards if c.uuid == card), None)
        if found is None or not found.memory_limits:
            raise LimitError(f"card {card}: the driver has no per-cgroup memory limits")
        self.limits[(card, namespace)] = (soft_bytes, hard_bytes)

    def wait_events(self, timeout_seconds: float) -> list[XidEvent]:
        """XID events added to the state since the last call (each delivered once)."""
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            events = self._pending()
            while not events and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(left, FILE_CHECK_SECONDS))
                events = self._pending()
            return events

    def _pending(self) -> list[XidEvent]:
        self._reload()
        listed: Sequence[FakeXid] = self._state.xid
        if len(listed) < self._delivered:  # the list was rewritten from scratch
            self._delivered = 0
        fresh = listed[self._delivered :]
        self._delivered = len(listed)
        return [XidEvent(card=x.card, xid=x.xid) for x in fresh]

    def close(self) -> None:
        """Wake and end any wait for events."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def open_backend(spec: str) -> Nvml:
    """``real`` or ``fake:FILE`` (the ``--nvml`` flag)."""
    if spec == "real":
        try:
            return RealNvml()
        except ImportError as exc:
            raise errors.ConfigError(
                "--nvml real needs nvidia-ml-py (import pynvml), which is not installed"
            ) from exc
    kind, sep, file = spec.partition(":")
    if kind == "fake" and sep and file:
        return FakeNvml(path=Path(file))
    raise errors.ConfigError(f"--nvml {spec!r}: write 'real' or 'fake:FILE'")
