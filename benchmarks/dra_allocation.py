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

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonpatch

from benchmarks.scheduler_e2e import (
    GI,
    SIZES,
    arguments,
    burst,
    gpu_pod,
    register_nodes,
    scheduler_config,
)
from gpushare.core import config, dra, names
from gpushare.webhook import mutation
from tests import cluster
from tests.dra import objects
from tests.scheduler.extender import started

DRA = config.Settings(backend="dra")
CUDA_TOTAL = 80 * GI


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


def report(label: str, pods: int, seconds: float, cards: int) -> None:
    print(
        f"{label:<44} {pods} pods in {seconds:6.1f} s = {pods / seconds:5.0f} pods/s,"
        f" {cards} cards used",
        flush=True,
    )


def main() -> int:
    args = arguments(__doc__)
    work = Path(tempfile.mkdtemp(prefix="gpushare-dra-bench-"))
    sizes = [SIZES[i % len(SIZES)] for i in range(args.pods)]
    with cluster.ControlPlane() as cp:
        objects.install_device_class(cp.rest())
        owner = cluster.create_namespace(cp, "bench-nodes")
        register_nodes(cp, args.nodes, owner)
        dra_fleet(cp, args.nodes, owner)
        print(f"2 fleets of {args.nodes} nodes of 8 x 80 GiB registered", flush=True)
        with (
            started(cp, work, options=["--log-level=WARNING"]) as extender,
            cp.start_scheduler(scheduler_config(extender, args.qps)),
        ):
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
            seconds = burst(cp, ns, pods, then=objects.create_pod_claims)
            report("gpushare, DRA (kube-scheduler's allocator):", args.pods, seconds,
                   dra_cards(cp, ns))  # fmt: skip
            need = sum(units * GI + DRA.allocation_overhead_bytes for units in sizes)
            print(f"lower bound: {-(-need // dra.capacity_bytes(CUDA_TOTAL, GI))} cards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
