"""The simulation under the DRA backend: kube-scheduler's allocator places the trace's pods on the
cards the plugins publish as ResourceSlices, kube-controller-manager makes each pod's claim from the
webhook's template, and the simulated kubelet prepares it over the plugin's socket."""

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpushare.core import config, dra, errors, names
from gpushare.core.ids import CardUUID
from gpushare.core.quantities import GI
from gpushare.simulator import cluster, fleet, nodes
from gpushare.simulator.outcome import CardState, Failure, Placement
from tests.simulator.test_simulation import _isvc

FLEET = "2x2xH100-80GB"
SERVICES = [
    _isvc("big", "70Gi"),
    _isvc("mid", "30Gi"),
    _isvc("small-1", "8Gi"),
    _isvc("small-2", "8Gi"),
    _isvc("tuned", "20Gi", "--gpu-memory-utilization", "0.95"),
    _isvc("nowhere", "79Gi"),  # under the largest card's total, but no card has that room now
]
DRA = config.Settings(backend="dra")


@dataclass
class Evidence:
    results: dict[str, Placement | Failure] = field(default_factory=dict)
    cards: list[CardState] = field(default_factory=list)
    held: dict[CardUUID, int] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    settled: bool = False
    allocated_before: int = 0
    allocated_after: int = 0


async def _simulate() -> Evidence:
    evidence = Evidence()
    async with cluster.Simulation(fleet.parse(FLEET), base=DRA, control_plane="real") as sim:
        for service in SERVICES:
            evidence.results[service.name] = await sim.submit(service)
        evidence.cards = await sim.cards()
        evidence.held = sim.kubelet_grants()
        evidence.claims = await sim.plane.items(nodes.CLAIMS)
        for pod in await sim.plane.items(cluster.PODS):
            evidence.pods[pod["metadata"]["labels"]["serving.kserve.io/inferenceservice"]] = pod
        evidence.allocated_before = await sim.allocated_claims()
        await sim.remove(SERVICES[0])
        evidence.settled = await sim.settle()
        evidence.allocated_after = await sim.allocated_claims()
    return evidence


@pytest.fixture(scope="module")
def evidence() -> Evidence:
    return asyncio.run(_simulate())


@pytest.mark.cluster
def test_kube_scheduler_alone_places_what_fits_and_says_why_not(evidence: Evidence) -> None:
    placed = {name for name, r in evidence.results.items() if isinstance(r, Placement)}
    assert placed == {"big", "mid", "small-1", "small-2", "tuned"}
    nowhere = evidence.results["nowhere"]
    assert isinstance(nowhere, Failure) and nowhere.stage == "scheduling"
    assert "cannot allocate all claims" in nowhere.reason
    for name in placed:
        pod = evidence.pods[name]
        assert pod["spec"]["schedulerName"] == "default-scheduler"
        assert names.RESOURCE_GPU_MEMORY not in str(pod["spec"]["containers"][0]["resources"])


@pytest.mark.cluster
def test_each_placement_is_its_claims_allocation_prepared_on_the_node(evidence: Evidence) -> None:
    by_pod = {claim["metadata"]["ownerReferences"][0]["name"]: claim for claim in evidence.claims}
    unit, overhead = DRA.unit_bytes, DRA.allocation_overhead_bytes
    for name, result in evidence.results.items():
        if not isinstance(result, Placement):
            continue
        claim = by_pod[evidence.pods[name]["metadata"]["name"]]
        (allocated,) = dra.allocated(claim)
        assert allocated.pool == result.node
        assert allocated.device == dra.device_name(result.card_index)
        consumed = allocated.consumed_bytes
        granted = dra.granted_bytes(consumed, unit_bytes=unit, overhead_bytes=overhead)
        assert granted == result.granted_bytes


@pytest.mark.cluster
def test_no_card_holds_more_claims_than_its_capacity(evidence: Evidence) -> None:
    for card in evidence.cards:
        held = evidence.held.get(card.uuid, 0)
        assert card.granted_bytes == held
        assert held + len(card.services) * DRA.allocation_overhead_bytes <= card.capacity_bytes


@pytest.mark.cluster
def test_vllm_gets_the_utilization_the_webhook_wrote(evidence: Evidence) -> None:
    tuned = evidence.results["tuned"]
    assert isinstance(tuned, Placement)
    args = evidence.pods["tuned"]["spec"]["containers"][0]["args"]
    assert "0.95" not in args
    assert f"--gpu-memory-utilization={tuned.utilization}" in args
    assert tuned.used_bytes <= 20 * GI


@pytest.mark.cluster
def test_a_removed_pods_claim_is_deallocated_and_its_room_freed(evidence: Evidence) -> None:
    # The claim stays (only the garbage collector, not running here, deletes it by its owner)
    # but kube-controller-manager drops the pod's reservation and the allocation with it.
    assert evidence.allocated_before == 5
    assert evidence.settled
    assert evidence.allocated_after == 4


def test_the_dra_backend_refuses_the_embedded_control_plane() -> None:
    with pytest.raises(errors.BadRequest, match="needs the real control plane"):
        cluster.Simulation(fleet.parse(FLEET), base=DRA, control_plane="embedded")


@pytest.mark.cluster
def test_simulate_prints_both_backends_beside_the_optimum() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "simulate", "--backend", "dra",
         "--optimum-seconds", "5"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend dra" in done.stdout
    assert "cards used on this trace: dra" in done.stdout
    assert "extender" in done.stdout and "optimum" in done.stdout
