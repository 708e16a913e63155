"""kube-scheduler alone places the webhook's DRA pods: memory of one card, never past its capacity.

Real kube-apiserver and kube-scheduler 1.36 at their default feature gates and default profile; no
extender. Each node has a ResourceSlice as the agent publishes it; each pod is a fixture
InferenceService's predictor pod as KServe makes it, rewritten by the webhook's mutation with
``backend: dra``, with its claim made from the template as the ResourceClaim controller would.
"""

import collections
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from gpushare.core import config, dra, names, quantities
from tests import cluster
from tests.dra import objects
from tests.webhook import builders

SETTINGS = config.Settings(backend="dra")
OVERHEAD = SETTINGS.allocation_overhead_bytes
H100_TOTAL = objects.H100_TOTAL
H100_RESERVED = objects.H100_RESERVED
SIZES = ("20Gi", "12Gi", "30Gi", "8Gi", "16Gi")


@pytest.fixture
def scheduler(control_plane: cluster.ControlPlane) -> Iterator[cluster.Scheduler]:
    """kube-scheduler with its default profile (DynamicResources on by default)."""
    objects.install_device_class(control_plane.rest())
    with control_plane.start_scheduler() as running:
        yield running


@contextlib.contextmanager
def _fleet(
    rest: cluster.Rest, namespace: str, *, count: int, cards: int
) -> Iterator[dict[tuple[str, str], int]]:
    """GPU nodes with their slices (deleted afterwards); the capacity of each (pool, device)."""
    nodes, capacity = [], {}
    for n in range(count):
        name = cluster.unique_name(f"{namespace}-dra-{n}")
        reports = [
            cluster.gpu_card(i, total=H100_TOTAL, reserved=H100_RESERVED) for i in range(cards)
        ]
        cluster.register_gpu_node(
            rest, name, reports, gpu_units=0, owner=namespace, cpu="1000", memory="8Ti", pods=500
        )
        body = objects.publish_slice(
            rest, name, reports, unit_bytes=SETTINGS.unit_bytes, overhead=OVERHEAD
        )
        for device in body["spec"]["devices"]:
            value = device["capacity"][names.DRA_CAPACITY_MEMORY]["value"]
            capacity[(name, device["name"])] = quantities.parse_bytes(value)
        nodes.append(name)
    try:
        yield capacity
    finally:
        objects.delete_slices(rest, nodes)


def _bound(rest: cluster.Rest, namespace: str, expected: int) -> list[dict[str, Any]] | None:
    pods: list[dict[str, Any]] = rest.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
    placed = [p for p in pods if p["spec"].get("nodeName")]
    return placed if len(placed) >= expected else None


def _consumption(
    rest: cluster.Rest, namespace: str
) -> tuple[dict[tuple[str, str], int], dict[str, str]]:
    """Bytes consumed per (pool, device), and the pool each claim's pod was allocated on."""
    used: dict[tuple[str, str], int] = collections.defaultdict(int)
    pools = {}
    for claim in objects.claims(rest, namespace):
        for result in dra.allocated(claim):
            used[(result.pool, result.device)] += result.consumed_bytes
            pools[claim["metadata"]["name"]] = result.pool
    return used, pools


def test_the_fixture_pods_get_memory_on_cards_from_kube_scheduler_alone(
    control_plane: cluster.ControlPlane, namespace: str, scheduler: cluster.Scheduler
) -> None:
    rest = control_plane.rest()
    with _fleet(rest, namespace, count=2, cards=2) as capacity:
        pods = [
            objects.create_pod(rest, namespace, memory, fixture)
            for memory, fixture in zip(SIZES, itertools.cycle(builders.FIXTURES), strict=False)
        ]
        placed = cluster.wait_for(
            lambda: _bound(rest, namespace, len(pods)), timeout=60, what="every pod bound"
        )
        used, pools = _consumption(rest, namespace)
        for pod in placed:
            (status,) = pod["status"]["resourceClaimStatuses"]
            claim_name = status["resourceClaimName"]
            assert pools[claim_name] == pod["spec"]["nodeName"]
            assert pod["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
            claim = rest.get(
                f"{objects.RESOURCE}/namespaces/{namespace}/resourceclaims/{claim_name}"
            )
            assert [r["name"] for r in claim["status"]["reservedFor"]] == [pod["metadata"]["name"]]
            (result,) = dra.allocated(claim)
            memory = pod["metadata"]["annotations"][names.ANNOTATION_GPU_MEMORY]
            granted = dra.granted_bytes(
                result.consumed_bytes, unit_bytes=SETTINGS.unit_bytes, overhead_bytes=OVERHEAD
            )
            assert granted == quantities.parse_bytes(memory)
        assert all(used[key] <= capacity[key] for key in used)


def test_a_burst_never_puts_more_on_a_card_than_it_has(
    control_plane: cluster.ControlPlane, namespace: str, scheduler: cluster.Scheduler
) -> None:
    # Scaled down from 1,000 pods on 200 nodes (benchmarks/dra_allocation.py) for a small machine;
    # more is asked than the cards hold, so the allocator has to refuse some.
    rest = control_plane.rest()
    with _fleet(rest, namespace, count=4, cards=2) as capacity:
        sizes = list(itertools.islice(itertools.cycle(SIZES), 40))
        for memory in sizes:
            objects.create_pod(rest, namespace, memory, builders.FIXTURES[1])
        held = sum(capacity.values())
        asked = sum(quantities.parse_bytes(m) + OVERHEAD for m in sizes)
        assert asked > held

        def settled() -> list[dict[str, Any]] | None:
            pods = rest.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
            waiting = [p for p in pods if not p["spec"].get("nodeName") and not _unschedulable(p)]
            return None if waiting else pods

        pods = cluster.wait_for(settled, timeout=120, what="every pod bound or unschedulable")
        used, _ = _consumption(rest, namespace)
        over = {key: used[key] for key in used if used[key] > capacity[key]}
        assert not over
        bound = [p for p in pods if p["spec"].get("nodeName")]
        assert 0 < len(bound) < len(sizes)


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return str(condition.get("message", ""))
    return None


def test_a_pod_that_fits_no_card_stays_pending_with_the_schedulers_reason(
    control_plane: cluster.ControlPlane, namespace: str, scheduler: cluster.Scheduler
) -> None:
    rest = control_plane.rest()
    with _fleet(rest, namespace, count=1, cards=1):
        first = objects.create_pod(rest, namespace, "40Gi", builders.FIXTURES[0])
        cluster.wait_for(lambda: _bound(rest, namespace, 1), timeout=60, what="the first pod bound")
        second = objects.create_pod(rest, namespace, "60Gi", builders.FIXTURES[1])
        path = f"/api/v1/namespaces/{namespace}/pods/{second['metadata']['name']}"
        message = cluster.wait_for(
            lambda: _unschedulable(rest.get(path)), timeout=60, what="the scheduler's verdict"
        )
        assert "cannot allocate all claims" in message
        assert not rest.get(path)["spec"].get("nodeName")
        assert first["metadata"]["name"] != second["metadata"]["name"]
