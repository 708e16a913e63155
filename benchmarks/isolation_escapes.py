"""Escapes from isolation on a real GPU, against the product's own Allocate.

    python3 benchmarks/isolation_escapes.py --out DIR            # a GPU machine, as root
    python3 benchmarks/isolation_escapes.py --out DIR --dry-run  # CPU: stand-ins throughout

For each isolation mode (``mps``, ``mps-shared``) the device plugin's agent runs as on a node: real
NVML, real MPS (the agent starts ``nvidia-cuda-mps-control`` itself), its gRPC socket, kubelet's
device-manager side (the simulator's) calling ``GetPreferredAllocation``, ``Allocate`` and
``PreStartContainer`` over it and serving ``PodResources``; it polls every ``--poll`` seconds with
``agent.escape_action: evict``. For each escape a pod is granted ``--grant-gib`` (10 GiB) and a
child Python process (the container) starts with Allocate's environment, changed the way the escape
changes it, and allocates ``--chunk-mib`` (512 MiB) chunks with torch up to ``--cap-gib`` (30 GiB):

==============  ================================================================================
cooperative     Allocate's environment as given (the baseline: must be held and not flagged)
raise-limit     ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=<card>=60G``
drop-pipe       ``CUDA_MPS_PIPE_DIRECTORY`` unset (no daemon at the default ``/tmp/nvidia-mps``)
empty-pipe      ``CUDA_MPS_PIPE_DIRECTORY`` pointing at an empty folder
own-daemon      starts its own ``nvidia-cuda-mps-control -d`` and connects to it with no limit
unseen-gpu      ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=2G,1=4G`` with one visible GPU
unknown-uuid    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=<a UUID no card has>=2G``
==============  ================================================================================

A process belongs to its pod here by an environment marker (or an ancestor's: the child is a
subreaper, so a daemon it starts stays its descendant), standing in for the cgroup a container
runtime gives it. The agent's Events and evictions are recorded by this script's ``NodeApi`` (their
wire to a real API server is tested in ``tests/deviceplugin/test_cluster.py``); a child is killed
once its figures are in, as kubelet kills an evicted pod's containers. Each scenario's verdict:

``held``     it got no more than its grant, and no escape was reported;
``caught``   it got more, and the agent posted its Event and evicted the pod within ``--poll`` + 1 s
             of the process's first allocation;
``ESCAPED``  it got more and was not caught in time; ``FALSE-ALARM``: held, yet reported.

It prints a table (MiB obtained per mode and escape, detection latency) and writes
``DIR/isolation-escapes.json`` after every scenario. Nothing here changes a card's compute mode,
MIG mode or clocks. Daemons and processes it started are stopped on every exit path.

The GPU machine has no package registry. From a checkout, ``gpushare`` is importable through a link
tree this script builds when it is not installed; what the machine's Python lacks (pydantic and
kubernetes_asyncio with their own needs) travels as wheels, as for ``benchmarks/gpu_proof.py``
(docs/gpu-proof.md, "Repeating the run"): ``PYTHONPATH=/tmp/gs python3 benchmarks/...``.
"""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _importable_from_checkout() -> None:
    """Map the checkout's folders onto ``gpushare.*`` as pyproject's package-dir does (where the
    product is not installed), and make ``benchmarks`` importable."""
    sys.path.insert(0, str(ROOT))
    try:
        import gpushare  # noqa: F401, PLC0415
    except ImportError:
        import tomllib  # noqa: PLC0415

        folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ]
        tree = Path(tempfile.mkdtemp(prefix="gpushare-tree-"))
        atexit.register(shutil.rmtree, tree, True)
        (tree / "gpushare").mkdir()
        for entry in (ROOT / folders["gpushare"]).iterdir():
            (tree / "gpushare" / entry.name).symlink_to(entry)
        for package, folder in folders.items():
            if package != "gpushare":
                (tree / package.replace(".", "/")).symlink_to(ROOT / folder)
        sys.path.insert(0, str(tree))


_importable_from_checkout()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Mapping  # noqa: E402
from typing import Any, Final  # noqa: E402

import prometheus_client  # noqa: E402

from gpushare.core import config, names, quantities  # noqa: E402
from gpushare.core.ids import pod_key  # noqa: E402
from gpushare.deviceplugin import escapes, mps, nvml  # noqa: E402
from gpushare.deviceplugin.agent import Agent  # noqa: E402
from gpushare.deviceplugin.kube import PodEvent  # noqa: E402
from gpushare.deviceplugin.main import serve  # noqa: E402
from gpushare.deviceplugin.metrics import Metrics  # noqa: E402
from gpushare.deviceplugin.podresources import PodResourcesClient  # noqa: E402
from gpushare.deviceplugin.pods import PodInfo  # noqa: E402
from gpushare.deviceplugin.watchdog import Location  # noqa: E402
from gpushare.simulator import kubelet, mpsfake  # noqa: E402
from gpushare.simulator.nodes import quit_daemon, quit_daemons  # noqa: E402

MI: Final = quantities.MI
GI: Final = quantities.GI
NODE: Final = "gpu-node"
NAMESPACE: Final = "escapes"
MARKER: Final = "ISOLATION_ESCAPES_CONTAINER"
"""The child's environment names its pod and container (``<uid>/<container id>``)."""
ESCAPES: Final = (
    "cooperative",
    "raise-limit",
    "drop-pipe",
    "empty-pipe",
    "own-daemon",
    "unseen-gpu",
    "unknown-uuid",
)
UNKNOWN_UUID: Final = "GPU-00000000-0000-4000-8000-000000000000"
DEFAULT_PIPE: Final = Path("/tmp/nvidia-mps")
"""Where CUDA looks for a daemon when ``CUDA_MPS_PIPE_DIRECTORY`` is unset."""
START_SECONDS: Final = 60.0
"""A child must have allocated (or failed) this long after it starts: torch's import and CUDA's
start take seconds; a wedged child is killed and recorded."""
DRY_CARD: Final = "GPU-00000000-0000-4000-8000-0000000000d7"
DRY_TOTAL: Final = 81559 * MI
DRY_RESERVED: Final = 480 * MI
DRY_CONTEXT: Final = 512 * MI
"""What a CUDA context takes inside an MPS limit (measured: a client under L sees L - ~0.5 GiB)."""

Json = dict[str, Any]

# The container: JSON lines on stdout, then it holds its memory until stdin closes or it is killed.
CHILD: Final = r"""
import ctypes, json, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: what it starts stays below it
def say(**kw):
    print(json.dumps({"t": time.time(), **kw}), flush=True)
chunk, cap, control = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
own = os.environ.pop("ISOLATION_ESCAPES_OWN_DAEMON", "")
if own:
    log = os.path.join(own, "log")
    os.makedirs(log, exist_ok=True)
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=own, CUDA_MPS_LOG_DIRECTORY=log)
    os.environ.pop("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", None)
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc = subprocess.run([control, "-d"], **quiet).returncode  # keeps no pipe of ours open
    say(phase="own-daemon", rc=rc)
held = 0
try:
    ALLOCATE
except Exception as exc:
    say(phase="stopped", error=f"{type(exc).__name__}: {str(exc)[:200]}", allocated=held)
say(phase="done", allocated=held)
sys.stdin.readline()
"""
REAL_ALLOCATE: Final = """
    import torch
    keep = []
    while held + chunk <= cap:
        keep.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        held += chunk
        if len(keep) == 1:
            say(phase="context")
"""
DRY_ALLOCATE: Final = """
    sys.path.insert(0, os.environ["ISOLATION_ESCAPES_DRY"])
    import dry_cuda
    held = dry_cuda.allocate(chunk, cap, say)
"""
DRY_CUDA: Final = r'''
"""CUDA and MPS as this script's dry run stands them in (driver 580 as measured, and NVIDIA's
documented r615 fall of a limit naming a GPU the process cannot see, taken as the worst case)."""
import json, os, re
from pathlib import Path

STATE = Path(os.environ["ISOLATION_ESCAPES_DRY"]) / "processes"
CONTEXT = %(context)d


def _alive(pipe):
    try:
        pid = int((pipe / "nvidia-cuda-mps-control.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _limit(pipe, visible):
    limits = []
    commands = pipe / "commands"
    for line in commands.read_text().splitlines() if commands.exists() else []:
        m = re.match(r"set_default_device_pinned_mem_limit\s+\S+\s+(\d+)M", line)
        if m:
            limits.append(int(m[1]) << 20)
    own = os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "")
    for part in filter(None, own.split(",")):
        device, _, size = part.partition("=")
        if device not in ("0", visible):
            return None  # a GPU it cannot see: every pinned limit falls
        number = int(size[:-1])
        limits.append(number << (30 if size[-1] == "G" else 20))
    if own and not limits:
        return None
    if os.environ.get("ISOLATION_ESCAPES_SHARED") and own:
        return limits[-1]  # a shared daemon has no default: the variable is the limit
    return min(limits) if limits else None


def allocate(chunk, cap, say):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    server = _alive(pipe)
    limit = _limit(pipe, visible) if server else None
    kind = "mps-client" if server else "cuda"
    room = cap if limit is None else max(min(cap, limit - CONTEXT), 0)
    held = (room // chunk) * chunk
    STATE.mkdir(exist_ok=True)
    entries = [(os.getpid(), kind, held + CONTEXT)]
    if server and pipe.parent != Path(os.environ["ISOLATION_ESCAPES_MPS_ROOT"]):
        entries.append((server, "mps-server", 66 << 20))  # its own daemon's server
    for pid, k, used in entries:
        (STATE / f"{pid}.json").write_text(json.dumps({"kind": k, "used": used}))
    say(phase="context")
    return held
'''


# ----- stand-ins for the node ------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One call the agent made to the API server."""

    at: float
    verb: str
    pod: str
    reason: str = ""
    message: str = ""


class RecordingApi:
    """The agent's API server (a ``NodeApi``): every call recorded with its time."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    async def patch_node_annotations(
        self, node: str, annotations: Mapping[str, str | None]
    ) -> None:
        self.records.append(Record(time.time(), "patch-node", node))

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> None:
        self.records.append(Record(time.time(), "patch-pod", f"{namespace}/{name}"))

    async def list_pods(self, node: str) -> tuple[list[PodInfo], str]:
        return [], ""

    async def watch_pods(
        self, node: str, resource_version: str, seconds: int
    ) -> AsyncIterator[PodEvent]:
        changes: list[PodEvent] = []
        for change in changes:
            yield change

    async def post_event(
        self, pod: PodInfo, *, reason: str, message: str, warning: bool = True, node: str = ""
    ) -> None:
        self.records.append(Record(time.time(), "event", pod.key, reason, message))

    async def evict(self, namespace: str, name: str) -> None:
        self.records.append(Record(time.time(), "evict", f"{namespace}/{name}"))

    def of(self, pod: str, verb: str) -> list[Record]:
        """The pod's evictions, or its escape Events (not the agent's other Events)."""
        return [
            r
            for r in self.records
            if r.pod == pod and r.verb == verb and r.reason in ("", escapes.REASON)
        ]


class Pods:
    """The node's pods, as the test places them (the agent's pod source)."""

    def __init__(self) -> None:
        self.items: list[PodInfo] = []

    def pods(self) -> list[PodInfo]:
        return list(self.items)

    async def refresh(self) -> list[PodInfo]:
        return list(self.items)


class MarkerLocator:
    """A process's pod and container from its own or an ancestor's environment marker."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc

    def locate(self, pid: int) -> Location | None:
        current = pid
        for _ in range(64):
            marker = self._marker(current)
            if marker is not None:
                uid, _, cid = marker.partition("/")
                return Location(uid, cid)
            parent = self._parent(current)
            if parent is None or parent <= 1:
                return None
            current = parent
        return None

    def _marker(self, pid: int) -> str | None:
        try:
            environ = (self._proc / str(pid) / "environ").read_bytes()
        except OSError:
            return None
        for entry in environ.split(b"\0"):
            key, _, value = entry.partition(b"=")
            if key == MARKER.encode():
                return value.decode()
        return None

    def _parent(self, pid: int) -> int | None:
        try:
            stat = (self._proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        return int(stat.rpartition(")")[2].split()[1])


class DryNvml(nvml.FakeNvml):
    """One stand-in H100 whose processes are what the dry children wrote down.

    The fake backend's arithmetic and its answers to events and limits (none), with the state
    read afresh from the children's notes at each look."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self._folder = folder

    @property
    def state(self) -> nvml.FakeState:
        processes = []
        for path in (self._folder / "processes").glob("*.json"):
            pid = int(path.stem)
            if not Path(f"/proc/{pid}").exists():
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(path.read_text())
                processes.append(
                    {"pid": pid, "card": DRY_CARD, "used": data["used"], "kind": data["kind"]}
                )
        card = {"uuid": DRY_CARD, "index": 0, "total": DRY_TOTAL, "reserved": DRY_RESERVED}
        return nvml.FakeState.model_validate({"cards": [card], "processes": processes})


# ----- options, results ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    out: Path
    modes: tuple[str, ...]
    escapes: tuple[str, ...]
    grant_bytes: int
    cap_bytes: int
    chunk_bytes: int
    poll_seconds: float
    python: str
    dry_run: bool
    deadline: float


class Results:
    """``DIR/isolation-escapes.json``, rewritten after every scenario."""

    def __init__(self, path: Path, data: Json) -> None:
        self.path = path
        self.data = data

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def verdict(row: Json, *, grant_mib: int, poll_seconds: float) -> str:
    """held, caught, ESCAPED or FALSE-ALARM (see the module's docstring)."""
    over = row.get("allocated_mib") is None or row["allocated_mib"] > grant_mib
    evicted = row.get("evicted_after_s")
    reported = row.get("event_after_s") is not None
    if not over:
        return "FALSE-ALARM" if reported else "held"
    if reported and evicted is not None and evicted <= poll_seconds + 1.0:
        return "caught"
    return "ESCAPED"


# ----- one mode --------------------------------------------------------------------------------


class Node:
    """The agent and kubelet of one node under one isolation mode."""

    def __init__(self, opts: Options, mode: str, work: Path) -> None:
        self.opts = opts
        self.mode = mode
        self.work = work
        self.api = RecordingApi()
        self.pods = Pods()
        self.control = mps.CONTROL
        self._task: asyncio.Task[None] | None = None

    @property
    def mps_root(self) -> Path:
        return self.work / "mps"

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        backend: nvml.Nvml
        if self.opts.dry_run:
            self.control = str(mpsfake.install(self.work / "bin"))
            backend = DryNvml(self.opts.out / "dry")
        else:
            backend = nvml.RealNvml()
        settings = config.validate(
            {
                "isolation": self.mode,
                "agent": {
                    "kubelet_dir": str(self.work / "kubelet"),
                    "mps_root": str(self.mps_root),
                    "poll_seconds": self.opts.poll_seconds,
                    "escape_action": "evict",
                },
            }
        )
        self.kubelet = kubelet.Kubelet(NODE, self.work / "kubelet", names.RESOURCE_GPU_MEMORY)
        await self.kubelet.start()
        self.agent = Agent(
            settings,
            node=NODE,
            nvml=backend,
            mode=mps.make(settings.isolation, self.mps_root, control=self.control),
            metrics=Metrics(prometheus_client.CollectorRegistry(), node=NODE),
            api=self.api,
            pods=self.pods,
            podresources=PodResourcesClient(self.work / "kubelet/pod-resources/kubelet.sock"),
            locator=MarkerLocator(),
        )
        self._task = asyncio.create_task(serve(self.agent, kubelet_dir=self.work / "kubelet"))
        deadline = time.monotonic() + 60
        while not self.kubelet.listed.is_set():
            if self._task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.mode}: the device plugin listed no IDs")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.kubelet.stop()
        with contextlib.suppress(Exception):
            if self.agent.podresources is not None:
                await self.agent.podresources.close()
        quit_daemons(self.mps_root, self.control)
        with contextlib.suppress(Exception):
            self.agent.nvml.close()

    async def scenario(self, escape: str) -> Json:
        """One pod, one child, one escape; returns its row."""
        uid = str(uuid.uuid4())
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        name = f"{self.mode}-{escape}"
        key = pod_key(NAMESPACE, name)
        self.pods.items.append(
            PodInfo(
                NAMESPACE, name, uid=uid, node=NODE, phase="Running", container_ids={cid: "main"}
            )
        )
        units = self.opts.grant_bytes // GI
        allocated = await self.kubelet.allocate(key, "main", units)
        env = self.environment(escape, dict(allocated.envs), marker=f"{uid}/{cid}")
        row: Json = {"mode": self.mode, "escape": escape}
        # A file, not a pipe: a child that writes much to stderr must never block on it.
        log = self.work / f"{escape}.stderr"
        with log.open("wb") as stderr:
            child = await self._spawn(env, stderr.fileno())
        try:
            await self._follow(child, row, log)
            if row.get("context_at") is not None:
                # Give the agent its chance: a poll, then one second, after the first allocation.
                until = row["context_at"] + self.opts.poll_seconds + 1.0
                while time.time() < until and not self.api.of(key, "evict"):
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
            row["nvml"] = self.seen_by_agent(f"{uid}/{cid}")
        finally:
            await kill_child(child, f"{uid}/{cid}", self.control, agents=self.mps_root)
            self.kubelet.release(key)
            self.pods.items = [p for p in self.pods.items if p.key != key]
        context_at = row.pop("context_at", None)
        for verb, field in (("event", "event_after_s"), ("evict", "evicted_after_s")):
            calls = self.api.of(key, verb)
            row[field] = (
                round(calls[0].at - context_at, 3) if calls and context_at is not None else None
            )
            if verb == "event" and calls:
                row["event"] = f"{calls[0].reason}: {calls[0].message}"
        row["verdict"] = verdict(
            row, grant_mib=self.opts.grant_bytes // MI, poll_seconds=self.opts.poll_seconds
        )
        return row

    def seen_by_agent(self, marker: str) -> list[Json]:
        """The pod's processes in the agent's last NVML reading: how each held the card."""
        uid, _, cid = marker.partition("/")
        locator = MarkerLocator()
        return [
            {"pid": p.pid, "kind": p.kind, "used_mib": p.used_bytes // MI}
            for p in self.agent.last_snapshot.processes
            if locator.locate(p.pid) == Location(uid, cid)
        ]

    def environment(self, escape: str, envs: dict[str, str], *, marker: str) -> dict[str, str]:
        """The container's environment: Allocate's, changed the escape's way."""
        card = envs[names.ENV_VISIBLE_DEVICES]
        env = {**os.environ, **envs, "CUDA_VISIBLE_DEVICES": card, MARKER: marker}
        if escape == "raise-limit":
            env[names.ENV_MPS_MEM_LIMIT] = f"{card}=60G"
        elif escape == "drop-pipe":
            env.pop(names.ENV_MPS_PIPE_DIRECTORY, None)
        elif escape == "empty-pipe":
            env[names.ENV_MPS_PIPE_DIRECTORY] = tempfile.mkdtemp(prefix="empty-", dir=self.work)
        elif escape == "own-daemon":
            env["ISOLATION_ESCAPES_OWN_DAEMON"] = tempfile.mkdtemp(prefix="own-", dir=self.work)
        elif escape == "unseen-gpu":
            env[names.ENV_MPS_MEM_LIMIT] = "0=2G,1=4G"
        elif escape == "unknown-uuid":
            env[names.ENV_MPS_MEM_LIMIT] = f"{UNKNOWN_UUID}=2G"
        if self.opts.dry_run:
            env["ISOLATION_ESCAPES_DRY"] = str(self.opts.out / "dry")
            env["ISOLATION_ESCAPES_MPS_ROOT"] = str(self.mps_root)
            if self.mode == "mps-shared":
                env["ISOLATION_ESCAPES_SHARED"] = "1"
        return env

    async def _spawn(self, env: Mapping[str, str], stderr: int) -> asyncio.subprocess.Process:
        """Start the container's process, in a session of its own."""
        code = CHILD.replace("    ALLOCATE\n", DRY_ALLOCATE if self.opts.dry_run else REAL_ALLOCATE)
        return await asyncio.create_subprocess_exec(
            self.opts.python,
            "-c",
            code,
            str(self.opts.chunk_bytes),
            str(self.opts.cap_bytes),
            self.control,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )

    async def _follow(self, child: asyncio.subprocess.Process, row: Json, log: Path) -> None:
        """Read the child's lines until it is done, stopped or past its time."""
        assert child.stdout is not None
        deadline = time.monotonic() + START_SECONDS
        while True:
            left = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(child.stdout.readline(), max(left, 0.01))
            except TimeoutError:
                row["error"] = f"no answer within {START_SECONDS:.0f} s"
                return
            if not line:
                await child.wait()
                err = log.read_text(errors="replace")
                row.setdefault("error", f"exited ({child.returncode}): {err[-400:]}")
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not one of the child's own lines
            phase = message.get("phase")
            if phase == "context":
                row["context_at"] = message["t"]
            elif phase == "own-daemon":
                row["own_daemon_rc"] = message["rc"]
            elif phase == "stopped":
                row["stopped_by"] = message["error"]
            elif phase == "done":
                row["allocated_mib"] = message["allocated"] // MI
                return


async def kill_child(
    child: asyncio.subprocess.Process, marker: str, control: str, *, agents: Path
) -> None:
    """End the child, then what it left (its own MPS daemon included), as kubelet would.

    The child first gets to exit by itself (its stdin closes), so an MPS server sees its client
    leave rather than vanish; what is left after a few seconds is killed.
    """
    pipes = own_pipes(marker, besides=agents)
    if child.stdin is not None:
        child.stdin.close()
    try:
        await asyncio.wait_for(child.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.wait(), 10)
    for pipe in pipes:
        await asyncio.to_thread(quit_daemon, pipe, control)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    for pid in marked(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def own_pipes(marker: str, *, besides: Path) -> list[Path]:
    """Pipe folders of the MPS daemons the child started itself (not the agent's, ``besides``)."""
    pipes = set()
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            for entry in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                if entry.startswith(b"CUDA_MPS_PIPE_DIRECTORY="):
                    pipes.add(Path(entry.partition(b"=")[2].decode()))
    return sorted(p for p in pipes if (p / mps.PID_FILE).exists() and not p.is_relative_to(besides))


# ----- the run ---------------------------------------------------------------------------------


async def run(opts: Options) -> Json:
    opts.out.mkdir(parents=True, exist_ok=True)
    results = Results(
        opts.out / "isolation-escapes.json",
        {
            "dry_run": opts.dry_run,
            "poll_seconds": opts.poll_seconds,
            "grant_mib": opts.grant_bytes // MI,
            "cap_mib": opts.cap_bytes // MI,
            "chunk_mib": opts.chunk_bytes // MI,
            "rows": [],
        },
    )
    if opts.dry_run:
        (opts.out / "dry").mkdir(exist_ok=True)
        (opts.out / "dry" / "dry_cuda.py").write_text(DRY_CUDA % {"context": DRY_CONTEXT})
    elif mps.alive(DEFAULT_PIPE):
        results.data["warning"] = (
            f"an MPS daemon serves the default pipe folder {DEFAULT_PIPE}: drop-pipe connects to it"
        )
    for mode in opts.modes:
        work = Path(tempfile.mkdtemp(prefix=f"esc-{mode}-", dir="/tmp"))
        node = Node(opts, mode, work)
        try:
            await node.start()
            card = next(iter(node.agent.cards.values()), None)
            if card is not None:
                results.data["card"] = {"model": card.model, "total_mib": card.total_bytes // MI}
            for escape in opts.escapes:
                if time.monotonic() > opts.deadline:
                    results.data["cut_short"] = f"deadline reached before {mode}/{escape}"
                    break
                started = time.monotonic()
                try:
                    row = await node.scenario(escape)
                except Exception as exc:  # a scenario's failure is a figure, not the end
                    row = {"mode": mode, "escape": escape, "error": repr(exc), "verdict": "ERROR"}
                row["seconds"] = round(time.monotonic() - started, 1)
                results.data["rows"].append(row)
                results.save()
                print(line(row), flush=True)
        finally:
            await node.stop()
            shutil.rmtree(work, ignore_errors=True)
    results.save()
    return results.data


async def _until_terminated(opts: Options) -> Json:
    """Run; on SIGTERM stop what was started (every ``finally``) before exiting."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(opts)


def line(row: Json) -> str:
    def figure(value: Any, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    return (
        f"{row['mode']:<11} {row['escape']:<13} {figure(row.get('allocated_mib')):>8}"
        f" {figure(row.get('event_after_s'), ' s'):>9}"
        f" {figure(row.get('evicted_after_s'), ' s'):>9}"
        f"  {row['verdict']}{'  ' + row['error'] if row.get('error') else ''}"
    )


def table(data: Json) -> str:
    head = f"{'mode':<11} {'escape':<13} {'MiB got':>8} {'Event':>9} {'evicted':>9}  verdict"
    return "\n".join([head, *(line(row) for row in data["rows"])])


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="mps,mps-shared")
    parser.add_argument("--escapes", default=",".join(ESCAPES))
    parser.add_argument("--grant-gib", type=int, default=10)
    parser.add_argument("--cap-gib", type=int, default=30)
    parser.add_argument("--chunk-mib", type=int, default=512)
    parser.add_argument("--poll", type=float, default=1.0, help="the agent's poll interval (s)")
    parser.add_argument("--python", default=sys.executable, help="the containers' Python")
    parser.add_argument("--dry-run", action="store_true", help="stand-ins for CUDA, MPS, NVML")
    parser.add_argument(
        "--deadline", type=float, default=220.0, help="start no scenario after this many seconds"
    )
    args = parser.parse_args(argv)
    unknown = set(args.escapes.split(",")) - set(ESCAPES)
    if unknown:
        parser.error(f"unknown escapes {sorted(unknown)}; choose from {', '.join(ESCAPES)}")
    return Options(
        out=args.out,
        modes=tuple(args.modes.split(",")),
        escapes=tuple(args.escapes.split(",")),
        grant_bytes=args.grant_gib * GI,
        cap_bytes=args.cap_gib * GI,
        chunk_bytes=args.chunk_mib * MI,
        poll_seconds=args.poll,
        python=args.python,
        dry_run=args.dry_run,
        deadline=time.monotonic() + args.deadline,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if not opts.dry_run and (os.geteuid() != 0 or shutil.which(mps.CONTROL) is None):
        print(f"needs root and {mps.CONTROL} on PATH (or --dry-run)", file=sys.stderr)
        return 2
    try:
        data = asyncio.run(_until_terminated(opts))
    except asyncio.CancelledError:
        print("terminated: daemons and processes stopped; partial figures in the JSON")
        return 1
    print()
    print(table(data))
    print(f"\npoll {opts.poll_seconds} s; JSON: {opts.out / 'isolation-escapes.json'}")
    bad = [r for r in data["rows"] if r["verdict"] not in ("held", "caught")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
