"""Pods per second from creation to bound, under the real kube-scheduler and apiserver.

    python -m benchmarks.scheduler_e2e [--nodes 200] [--pods 1000] [--qps 500]

One run, one control plane (built by tests/controlplane/build.sh), one kube-scheduler with two
profiles from our manifest (``manifests/scheduler/kube-scheduler-config.yaml``): ``gpushare-
scheduler``, which calls ``gpushare scheduler`` (started by its command line) for pods asking for
``gpushare.io/gpu-memory``, and ``default-scheduler``, which never calls it. ``--nodes`` nodes of
8 x 80 GiB cards also offer 8 whole ``nvidia.com/gpu`` each.

1. Baseline: ``--pods`` pods asking for one whole ``nvidia.com/gpu`` through the default profile
   (NodeResourcesFit counts them, DefaultBinder binds them).
2. gpushare: the same number of pods as the webhook leaves them (``gpushare.io/gpu-memory`` units
   of 4 to 40 GiB, schedulerName ``gpushare-scheduler``): filter, prioritize and bind by the
   extender.

Pods are created from 8 threads as fast as the apiserver takes them; the clock runs from the first
creation to the last pod seen bound. kube-scheduler's client is allowed ``--qps`` requests per
second (default configuration: 50, which would cap the baseline's binds and Events and hide the
difference). Printed: both rates, their ratio, and the extender's CPU seconds per pod.
"""

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpushare.core import names
from tests import cluster
from tests.scheduler import extender as extender_process
from tests.scheduler.extender import ExtenderProcess, started

GI = 1024**3
SIZES = (20, 8, 12, 4, 40, 16, 24, 10, 6, 30)


def gpu_pod(name: str, namespace: str, units: int | None) -> dict[str, Any]:
    """A gpushare pod of ``units`` GiB as the webhook leaves it, or (None) one whole GPU."""
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": "vllm/vllm-openai:latest",
        "args": ["--model", "/mnt/models"],
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    spec: dict[str, Any] = {"containers": [container]}
    if units is None:
        container["resources"] = {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}}
        spec["schedulerName"] = "default-scheduler"
    else:
        container["args"].append(names.VLLM_UTILIZATION_ARG)
        container["resources"] = {"limits": {names.RESOURCE_GPU_MEMORY: str(units)}}
        metadata["annotations"] = {names.ANNOTATION_GPU_MEMORY: f"{units}Gi"}
        spec["schedulerName"] = names.SCHEDULER_NAME
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def register_nodes(cp: cluster.ControlPlane, count: int, owner: str) -> None:
    """``count`` nodes offering gpushare.io/gpu-memory (with node reports) and 8 nvidia.com/gpu."""

    def one(i: int) -> None:
        name = f"gpu-{i:04d}"
        cards = [cluster.gpu_card(c, total=80 * GI) for c in range(8)]
        rest = cp.rest()
        cluster.register_gpu_node(rest, name, cards, owner=owner)
        whole = {names.NVIDIA_GPU_RESOURCE: "8"}
        status = {"status": {"capacity": whole, "allocatable": whole}}
        rest.patch(f"/api/v1/nodes/{name}/status", status, "strategic")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def scheduler_config(extender: ExtenderProcess, qps: int) -> dict[str, Any]:
    """Our manifest pointed at ``extender``, plus the default profile, at ``qps`` API requests."""
    config = extender_process.scheduler_config(extender.url)
    config["profiles"].append({"schedulerName": "default-scheduler"})
    config["clientConnection"] = {"qps": qps, "burst": 2 * qps}
    return config


def burst(
    cp: cluster.ControlPlane,
    namespace: str,
    pods: list[dict[str, Any]],
    *,
    then: Callable[[cluster.Rest, dict[str, Any]], object] | None = None,
) -> float:
    """Create ``pods`` (calling ``then`` on each one created) and wait until all are bound.

    Seconds from the first creation to the last bind."""
    rest = cp.rest()
    path = f"/api/v1/namespaces/{namespace}/pods"

    def create(pod: dict[str, Any]) -> None:
        created = rest.create(path, pod)
        if then is not None:
            then(rest, created)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        creating = [pool.submit(create, pod) for pod in pods]

        def bound() -> bool:
            items = rest.get(path)["items"]
            return sum(1 for p in items if p["spec"].get("nodeName")) == len(pods)

        cluster.wait_for(bound, timeout=900, interval=0.05, what=f"{len(pods)} pods bound")
        for future in creating:
            future.result()
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def arguments(doc: str) -> argparse.Namespace:
    """``--nodes``, ``--pods`` and ``--qps``, described by the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--qps", type=int, default=500, help="kube-scheduler's API rate")
    return parser.parse_args()


def main() -> int:
    args = arguments(__doc__)
    work = Path(tempfile.mkdtemp(prefix="gpushare-e2e-"))
    with cluster.ControlPlane() as cp:
        owner = cluster.create_namespace(cp, "bench-nodes")
        begun = time.perf_counter()
        register_nodes(cp, args.nodes, owner)
        print(
            f"{args.nodes} nodes of 8 x 80 GiB registered in {time.perf_counter() - begun:.1f} s",
            flush=True,
        )
        with (
            started(cp, work, options=["--log-level=WARNING"]) as extender,
            cp.start_scheduler(scheduler_config(extender, args.qps)),
        ):
            baseline_ns = cluster.create_namespace(cp, "bench-whole-gpus")
            whole = [gpu_pod(f"w{i}", baseline_ns, None) for i in range(args.pods)]
            baseline = burst(cp, baseline_ns, whole)
            print(
                f"baseline, whole nvidia.com/gpu, default profile: {args.pods} pods in"
                f" {baseline:.1f} s = {args.pods / baseline:.0f} pods/s",
                flush=True,
            )
            shared_ns = cluster.create_namespace(cp, "bench-gpushare")
            shared = [gpu_pod(f"s{i}", shared_ns, SIZES[i % len(SIZES)]) for i in range(args.pods)]
            cpu = cpu_seconds(extender.pid)
            elapsed = burst(cp, shared_ns, shared)
            cpu = cpu_seconds(extender.pid) - cpu
            print(
                f"gpushare, GPU memory through the extender:      {args.pods} pods in"
                f" {elapsed:.1f} s = {args.pods / elapsed:.0f} pods/s"
                f" (extender CPU {cpu / args.pods * 1000:.1f} ms per pod)",
                flush=True,
            )
            print(f"ratio gpushare / baseline: {baseline / elapsed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
