"""Run gpushare's parts as the cluster runs them: ``gpushare <part> ...`` processes, on loopback."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from gpushare.core import names
from tests import cluster

ROOT: Final = Path(__file__).resolve().parents[2]
SHARED: Final = ROOT / "tests" / "data"
KSERVE_CRDS: Final = (
    "serving.kserve.io_inferenceservices.yaml",
    "serving.kserve.io_clusterservingruntimes.yaml",
)


class Part:
    """A running ``gpushare <part>`` process and its log."""

    def __init__(self, name: str, popen: "subprocess.Popen[bytes]", log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log

    def log(self, lines: int = 60) -> str:
        return cluster.tail(self.log_path, lines)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"gpushare {self.name} exited with {code}:\n{self.log()}")


@contextlib.contextmanager
def run(name: str, *args: str, log: Path, env: Mapping[str, str] | None = None) -> Iterator[Part]:
    """Run ``gpushare NAME ARGS`` until the block ends (SIGTERM, then SIGKILL)."""
    environ = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    environ.update(env or {})
    with log.open("ab") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gpushare.cli", name, *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    part = Part(name, popen, log)
    try:
        yield part
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def get(url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    """GET over plain HTTP: status and body (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ok(url: str, part: Part, *, timeout: float = 60.0) -> str:
    """Wait until ``url`` answers 200 while ``part`` runs; return the body."""

    def probe() -> str | None:
        part.check_alive()
        try:
            status, body = get(url, timeout=2)
        except OSError:
            return None
        return body if status == 200 else None

    try:
        return cluster.wait_for(probe, timeout=timeout, interval=0.2, what=url)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{part.log()}") from exc


def go_module(module: str, version: str) -> Path | None:
    """The folder of a Go module version from the Go module proxy (``go mod download``), or None."""
    go = shutil.which("go")
    if go is None:
        return None
    result = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=ROOT,
    )
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == '"Dir"':
            return Path(value.strip('",'))
    return None


def require(path: Path, what: str) -> Path:
    """``path``, or skip (fail under CI) when it is missing."""
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def apply_crds(cp: cluster.ControlPlane, files: list[Path]) -> None:
    """Install CustomResourceDefinitions (server side: some are too large for client side)."""
    args = ["apply", "--server-side", "--force-conflicts"]
    for path in files:
        args += ["-f", str(path)]
    cp.kubectl(*args)
    for path in files:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        cp.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


def install_kserve_crds(cp: cluster.ControlPlane) -> None:
    """KServe's InferenceService (and ClusterServingRuntime) CRDs from ``tests/data/kserve``."""
    kserve = require(SHARED / "kserve", "KServe's CRDs (tests/data/kserve)")
    apply_crds(cp, [require(kserve / name, "KServe CRD") for name in KSERVE_CRDS])


def mutated_pod(
    name: str, namespace: str, units: int, *, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A vLLM pod as the webhook leaves it: gpushare's scheduler, the resource in units."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            **({"labels": dict(labels)} if labels else {}),
            "annotations": {
                names.ANNOTATION_GPU_MEMORY: f"{units}Gi",
                names.ANNOTATION_MUTATED: str(units),
            },
        },
        "spec": {
            "schedulerName": names.SCHEDULER_NAME,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "vllm/vllm-openai:latest",
                    "args": ["--model", "/mnt/models", names.VLLM_UTILIZATION_ARG],
                    "resources": {"limits": {names.RESOURCE_GPU_MEMORY: str(units)}},
                }
            ],
        },
    }
