"""DRA against the extender against whole GPUs: pods per second and cards used, same run.

    python -m benchmarks.dra_allocation [--nodes 200] [--pods 1000] [--qps 500]

One control plane, one kube-scheduler (profiles ``default-scheduler`` and ``gpushare-scheduler``
from ``manifests/scheduler/kube-scheduler-config.yaml``, the extender started by its command line),
three fleets of ``--nodes`` nodes of 8 x 80 GiB cards, one per phase:

1. whole GPUs: ``--pods`` pods asking for one ``nvidia.com/gpu`` each, default profile;
2. extender: the same pods as the webhook leaves them for ``backend: extender`` (``gpushare.io/
   gpu-memory`` units of 4 to 40 GiB, ``gpushare-scheduler``);
3. DRA: the same pods as the webhook leaves them for ``backend: dra`` (a claim from the template
   of their size), default profile, each node's ResourceSlice as the agent publishes it. No
   kube-controller-manager runs, so this benchmark makes each pod's claim from its template as the
   ResourceClaim controller would, from 8 threads, inside the clock.

The clock runs from the first creation to the last pod seen bound. Cards used: distinct cards
holding a pod (whole GPUs: one per pod; extender: the card annotation the Binding wrote; DRA: the
devices in the claims' allocations, each checked to hold no more than its capacity).
"""

import argparse
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from gpushare import config, dra, names
from gpushare.webhook import mutation
from tests import cluster
from tests.dra import objects

GI = 1024**3
SIZES = (20, 8, 12, 4, 40, 16, 24, 10, 6, 30)
"""Grants in GiB, as benchmarks/scheduler_e2e.py uses them."""
MANIFEST = (
    Path(__file__).resolve().parents[1] / "manifests" / "scheduler" / "kube-scheduler-config.yaml"
)
DRA = config.Settings(backend="dra")
CUDA_TOTAL = 80 * GI


def gpu_pod(name: str, namespace: str, units: int | None) -> dict[str, Any]:
    """A pod of ``units`` GiB as the webhook leaves it for the extender, or one whole GPU."""
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": "vllm/vllm-openai:latest",
        "args": ["--model", "/mnt/models"],
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    spec: dict[str, Any] = {"containers": [container]}
    if units is None:
        container["resources"] = {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}}
    else:
        container["args"].append(names.VLLM_UTILIZATION_ARG)
        container["resources"] = {"limits": {names.RESOURCE_GPU_MEMORY: str(units)}}
        metadata["annotations"] = {names.ANNOTATION_GPU_MEMORY: f"{units}Gi"}
        spec["schedulerName"] = names.SCHEDULER_NAME
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def extender_fleet(cp: cluster.ControlPlane, count: int, owner: str) -> None:
    """Nodes offering gpushare.io/gpu-memory (with node reports) and 8 whole nvidia.com/gpu."""

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


def dra_fleet(cp: cluster.ControlPlane, count: int, owner: str) -> None:
    """Nodes with a ResourceSlice each (and no extended resource)."""

    def one(i: int) -> None:
        name = f"dra-{i:04d}"
        cards = [cluster.gpu_card(c, total=80 * GI) for c in range(8)]
        rest = cp.rest()
        cluster.register_gpu_node(rest, name, cards, gpu_units=0, owner=owner)
        objects.publish_slice(
            rest, name, cards, unit_bytes=DRA.unit_bytes, overhead=DRA.allocation_overhead_bytes
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def dra_pod(name: str, namespace: str, units: int) -> dict[str, Any]:
    """A whole-GPU vLLM pod with the annotation, mutated by the webhook for ``backend: dra``."""
    pod = gpu_pod(name, namespace, None)
    pod["metadata"]["annotations"] = {names.ANNOTATION_GPU_MEMORY: f"{units}Gi"}
    result = mutation.pod(pod, settings=DRA, largest_cuda_total_bytes=CUDA_TOTAL)
    assert result.allowed, result.message
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, list(result.patch))
    return patched


def templates(cp: cluster.ControlPlane, namespace: str) -> None:
    """The claim template of each size, as the webhook makes them."""
    for units in sorted(set(SIZES)):
        template = dra.claim_template(
            namespace,
            units * GI,
            unit_bytes=DRA.unit_bytes,
            overhead_bytes=DRA.allocation_overhead_bytes,
        )
        path = f"{objects.RESOURCE}/namespaces/{namespace}/resourceclaimtemplates"
        cp.rest().create(path, template)


def burst(
    cp: cluster.ControlPlane, namespace: str, pods: list[dict[str, Any]], *, claims: bool = False
) -> float:
    """Create the pods (and, with ``claims``, their claims); seconds to the last bind."""
    rest = cp.rest()
    path = f"/api/v1/namespaces/{namespace}/pods"

    def create(pod: dict[str, Any]) -> None:
        created = rest.create(path, pod)
        if claims:
            objects.create_pod_claims(rest, created)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        creating = [pool.submit(create, pod) for pod in pods]

        def bound() -> bool:
            items = rest.get(path)["items"]
            return sum(1 for p in items if p["spec"].get("nodeName")) == len(pods)

        cluster.wait_for(bound, timeout=900, interval=0.1, what=f"{len(pods)} pods bound")
        for future in creating:
            future.result()
    return time.perf_counter() - start


def extender_cards(cp: cluster.ControlPlane, namespace: str) -> int:
    items = cp.rest().get(f"/api/v1/namespaces/{namespace}/pods")["items"]
    return len(
        {
            (p["spec"]["nodeName"], p["metadata"]["annotations"][names.ANNOTATION_CARD_UUID])
            for p in items
        }
    )


def dra_cards(cp: cluster.ControlPlane, namespace: str) -> int:
    """Cards holding a claim; raises if any card's claims consume more than its capacity."""
    used: dict[tuple[str, str], int] = {}
    for claim in objects.claims(cp.rest(), namespace):
        for result in dra.allocated(claim):
            key = (result.pool, result.device)
            used[key] = used.get(key, 0) + result.consumed_bytes
    capacity = dra.capacity_bytes(CUDA_TOTAL, DRA.unit_bytes)
    over = {key: value for key, value in used.items() if value > capacity}
    if over:
        raise AssertionError(f"cards over their capacity: {over}")
    return len(used)


def start_extender(cp: cluster.ControlPlane, work: Path) -> tuple[cluster.Process, int]:
    port = cluster.free_port()
    extender = cluster.Process(
        "extender",
        [
            sys.executable, "-m", "gpushare.cli", "--log-level=WARNING", "scheduler",
            f"--listen=127.0.0.1:{port}", f"--kubeconfig={cp.kubeconfig}",
        ],
        work / "extender.log",
    )  # fmt: skip

    def ready() -> bool:
        extender.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    cluster.wait_for(ready, timeout=60, what="the extender")
    return extender, port


def report(label: str, pods: int, seconds: float, cards: int) -> None:
    print(
        f"{label:<44} {pods} pods in {seconds:6.1f} s = {pods / seconds:5.0f} pods/s,"
        f" {cards} cards used",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--qps", type=int, default=500, help="kube-scheduler's API rate")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpushare-dra-bench-"))
    sizes = [SIZES[i % len(SIZES)] for i in range(args.pods)]
    with cluster.ControlPlane() as cp:
        objects.install_device_class(cp.rest())
        owner = cluster.create_namespace(cp, "bench-nodes")
        extender_fleet(cp, args.nodes, owner)
        dra_fleet(cp, args.nodes, owner)
        print(f"2 fleets of {args.nodes} nodes of 8 x 80 GiB registered", flush=True)
        extender, port = start_extender(cp, work)
        scheduler_config: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
        scheduler_config["extenders"][0]["urlPrefix"] = (
            f"http://127.0.0.1:{port}/gpushare-scheduler"
        )
        scheduler_config["profiles"].append({"schedulerName": "default-scheduler"})
        scheduler_config["clientConnection"] = {"qps": args.qps, "burst": 2 * args.qps}
        try:
            with cp.start_scheduler(scheduler_config):
                ns = cluster.create_namespace(cp, "bench-whole-gpus")
                seconds = burst(cp, ns, [gpu_pod(f"w{i}", ns, None) for i in range(args.pods)])
                report("whole nvidia.com/gpu, default profile:", args.pods, seconds, args.pods)
                ns = cluster.create_namespace(cp, "bench-extender")
                pods = [gpu_pod(f"s{i}", ns, units) for i, units in enumerate(sizes)]
                seconds = burst(cp, ns, pods)
                cards = extender_cards(cp, ns)
                report("gpushare, extender:", args.pods, seconds, cards)
                ns = cluster.create_namespace(cp, "bench-dra")
                pods = [dra_pod(f"d{i}", ns, units) for i, units in enumerate(sizes)]
                templates(cp, ns)
                seconds = burst(cp, ns, pods, claims=True)
                report("gpushare, DRA (kube-scheduler's allocator):", args.pods, seconds,
                       dra_cards(cp, ns))  # fmt: skip
                need = sum(units * GI + DRA.allocation_overhead_bytes for units in sizes)
                print(f"lower bound: {-(-need // dra.capacity_bytes(CUDA_TOTAL, GI))} cards")
        finally:
            extender.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
