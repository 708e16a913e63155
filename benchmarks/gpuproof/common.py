"""What every step of the GPU proof shares: constants, options, the results file, one server."""

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from gpushare.core import names, quantities
from gpushare.simulator import kserve
from gpushare.simulator.controlplane.launch import free_port

GI: Final = quantities.GI
MI: Final = quantities.MI
NODE: Final = "gpu-node"
NAMESPACE: Final = "default"
INSTANCES: Final = (("llm-10g", 10), ("llm-16g", 16), ("llm-20g", 20), ("llm-24g", 24))
"""The four InferenceServices and their annotations in GiB (``--instances`` names others)."""
TARGET: Final = "llm-20g"
"""The instance whose latency is measured in every condition (``--target``)."""
NEIGHBOUR: Final = ("llm-24g", 24)
"""The busy neighbour of the compute-share phase."""
TOO_MANY: Final = ("llm-16g-more", 16)
"""A fifth service that the card cannot hold beside the four: the extender refuses it."""
GREEDY: Final = ("llm-6g-greedy", 6, "0.30")
"""A service that fits, started with a utilization set by hand far above its grant."""
PROMPT: Final = "San Francisco is a city in California. The quick brown fox jumps over the"
READY_SECONDS: Final = 420.0
"""A vLLM start takes ~70-80 s with torch.compile after a first ~210 s (H100); eager, less."""
REFUSAL_SECONDS: Final = 240.0
STOP_SECONDS: Final = 20.0
KV_MARKER: Final = re.compile(r"GPU KV cache size|Available KV cache memory")
"""vLLM has sized its cache: the next server may start without disturbing its measurement."""
REFUSAL: Final = re.compile(r"Free memory on device.*?(?:processes\.|$)", re.MULTILINE)
"""vLLM's start-up check refusing a utilization above the free memory it sees."""
DRY_CARD: Final = "GPU-00000000-0000-4000-8000-0000000000d7"
DRY_TOTAL: Final = 81559 * MI
DRY_RESERVED: Final = 480 * MI
"""An H100 80GB HBM3 as NVML reports it (measured), for dry runs."""
FAKE_VLLM: Final = Path(__file__).resolve().parents[2] / "tests" / "gpu" / "fakevllm"

Json = dict[str, Any]

_PORTS: dict[str, int] = {}


def port_of(name: str) -> int:
    """Every server runs on this host's network: each pod's args name a port of its own, free
    when first named (a fixed one could be another run's, which would answer for it)."""
    if name not in _PORTS:
        _PORTS[name] = free_port()
    return _PORTS[name]


@dataclasses.dataclass(frozen=True)
class Options:
    out: Path
    phases: tuple[str, ...]
    dry_run: bool
    fake_server: bool
    model: str
    python: str
    server_pythonpath: str
    mps_control: str
    requests: int
    tokens: int
    busy_streams: int
    eager: bool
    deadline: float
    """Monotonic time after which no new step begins (inf: none)."""
    repeats: int = 3
    """Latency runs per condition (their spread is reported)."""
    instances: tuple[tuple[str, int], ...] = INSTANCES
    target: str = TARGET
    share: int = 30
    """The busy neighbour's compute share in the share phase, percent."""
    max_model_len: int = 4096
    reserve: str = ""
    """The configuration's ``reserve_bytes`` (a quantity such as ``1536Mi``); empty: default."""
    throughput_seconds: float = 10.0
    """Each throughput window (0: throughput is not measured)."""


@dataclasses.dataclass
class Instance:
    """One InferenceService's pod and its server."""

    name: str
    gib: int
    port: int
    pod: str = ""
    uid: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Allocate's environment."""
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None
    spawned: float = 0.0
    ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> list[str]:
        return self.log_text().splitlines()[-lines:]


def isvc(
    name: str,
    gib: int,
    port: int,
    model: str,
    *,
    eager: bool,
    max_model_len: int = 4096,
    annotations: Mapping[str, str] | None = None,
) -> Json:
    """An InferenceService as a user writes it: one annotation on a vLLM container (and any
    other gpushare annotation given)."""
    args = [
        f"--port={port}",
        f"--model={model}",
        f"--served-model-name={name}",
        "--load-format=dummy",
        f"--max-model-len={max_model_len}",
        "--max-num-seqs=32",
        "--gpu-memory-utilization=0.9",
    ]
    if eager:
        args.append("--enforce-eager")
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {names.ANNOTATION_GPU_MEMORY: f"{gib}Gi", **(annotations or {})},
        },
        "spec": {
            "predictor": {
                "containers": [
                    {
                        "name": kserve.CONTAINER,
                        "image": "vllm/vllm-openai:v0.26.0",
                        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                        "args": args,
                        "env": [{"name": "VLLM_NO_USAGE_STATS", "value": "1"}],
                        "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                    }
                ]
            }
        },
    }


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s until {what}")
        await asyncio.sleep(0.1)
