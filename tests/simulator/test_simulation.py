"""The simulation runs the real parts on their real code paths and never over-commits a card.

One small cluster (two H100 and two L4 cards) serves every test of this module: the services
below go through the real webhook, extender and device plugins; afterwards every card is checked
against kubelet's device IDs, the extender's ledger and the fake NVML, and finally every card is
broken to show that placement goes through the extender's filter. It runs twice: on the embedded
API server, and on the real kube-apiserver and kube-scheduler (``cluster``).
"""

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpushare.core import config, names, nodereport, sizing
from gpushare.core.ids import CardUUID
from gpushare.core.quantities import GI
from gpushare.simulator import cluster, fleet, workload
from gpushare.simulator.outcome import CardState, Failure, Placement
from gpushare.simulator.planes import ControlPlaneName
from gpushare.webhook import paths

FLEET = "1x2xH100-80GB,1x2xL4-24GB"
WEBHOOK_MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "webhook"


def _isvc(
    name: str, memory: str, *args: str, key: str = names.ANNOTATION_GPU_MEMORY
) -> workload.Service:
    document = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "team", "annotations": {key: memory}},
        "spec": {"predictor": {"containers": [{
            "name": "kserve-container",
            "image": "vllm/vllm-openai:latest",
            "args": ["--model", "/mnt/models", *args],
            "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
        }]}},
    }
    return workload.parse(document, source="test")


SERVICES = [
    _isvc("tuned", "20Gi", "--gpu-memory-utilization", "0.95"),
    _isvc("big", "70Gi"),
    _isvc("small-1", "8Gi"),
    _isvc("small-2", "8Gi"),
    _isvc("mid", "30Gi"),
    _isvc("l4-size", "18Gi"),
    _isvc("nowhere", "79Gi"),  # passes admission (under the largest card) but fits no card now
    _isvc("typo", "10Gi", key="gpushare.io/gpu-mem"),
]


@dataclass
class Evidence:
    results: dict[str, Placement | Failure] = field(default_factory=dict)
    cards: list[CardState] = field(default_factory=list)
    held: dict[CardUUID, int] = field(default_factory=dict)
    overhead: int = 0
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    api_requests: dict[str, int] = field(default_factory=dict)
    after_fault: Placement | Failure | None = None


async def _simulate(control_plane: ControlPlaneName) -> Evidence:
    evidence = Evidence()
    async with cluster.Simulation(
        fleet.parse(FLEET), base=config.Settings(), control_plane=control_plane
    ) as sim:
        for service in SERVICES:
            evidence.results[service.name] = await sim.submit(service)
        evidence.cards = await sim.cards()
        evidence.held = sim.kubelet_grants()
        evidence.overhead = sim.overhead_bytes
        evidence.calls = await sim.extender_calls()
        evidence.api_requests = await sim.api_requests()
        for pod in await sim.plane.items(cluster.PODS):
            evidence.pods[pod["metadata"]["labels"]["serving.kserve.io/inferenceservice"]] = pod
        # Every card fails (an XID-free NVML error): the agents report them unhealthy, and the
        # extender's filter must keep the next service off them.
        for node_gpus in sim.node_gpus.values():
            state = node_gpus.state()
            for card in state["cards"]:
                card["error"] = "GPU is lost"
            node_gpus.path.write_text(json.dumps(state))
        await _until_reported_unhealthy(sim)
        evidence.after_fault = await sim.submit(_isvc("after-fault", "4Gi"))
    return evidence


async def _until_reported_unhealthy(sim: cluster.Simulation) -> None:
    for _ in range(200):
        reports = [
            nodereport.decode(node["metadata"]["annotations"][names.ANNOTATION_NODE_REPORT])
            for node in await sim.plane.items(cluster.NODES)
        ]
        if all(not card.healthy for report in reports for card in report.cards):
            await asyncio.sleep(0.5)  # the extender's watch delivers the last report
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the agents never reported the broken cards")


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("real", marks=pytest.mark.cluster)]
)
def evidence(request: pytest.FixtureRequest) -> Evidence:
    """One simulation on each control plane: the same services, the same answers."""
    return asyncio.run(_simulate(request.param))


def test_services_that_fit_run_and_the_others_say_why(evidence: Evidence) -> None:
    placed = {name for name, r in evidence.results.items() if isinstance(r, Placement)}
    assert placed == {"tuned", "big", "small-1", "small-2", "mid", "l4-size"}
    nowhere = evidence.results["nowhere"]
    assert isinstance(nowhere, Failure) and nowhere.stage == "scheduling"
    assert nowhere.reason.startswith("0/2 nodes are available:")
    typo = evidence.results["typo"]
    assert isinstance(typo, Failure) and typo.stage == "admission"
    assert "did you mean gpushare.io/gpu-memory" in typo.reason


def test_no_card_is_granted_more_than_it_holds(evidence: Evidence) -> None:
    for card in evidence.cards:
        held = evidence.held.get(card.uuid, 0)
        holders = len(card.services)
        assert held + holders * evidence.overhead <= card.capacity_bytes, card
        assert card.used_bytes <= held + holders * evidence.overhead, card


def test_the_extenders_ledger_agrees_with_kubelets_device_ids(evidence: Evidence) -> None:
    for card in evidence.cards:
        held = evidence.held.get(card.uuid, 0)
        expected = held + len(card.services) * evidence.overhead if held else 0
        assert card.granted_bytes == expected, card


def test_each_pod_runs_on_the_card_its_binding_named(evidence: Evidence) -> None:
    for name, result in evidence.results.items():
        if not isinstance(result, Placement):
            continue
        pod = evidence.pods[name]
        assert pod["spec"]["nodeName"] == result.node
        assert pod["metadata"]["annotations"][names.ANNOTATION_CARD_UUID] == result.card_uuid
        assert pod["status"]["phase"] == "Running"


def test_the_webhooks_patch_reaches_vllm_through_the_device_plugins_environment(
    evidence: Evidence,
) -> None:
    tuned = evidence.results["tuned"]
    assert isinstance(tuned, Placement)
    pod = evidence.pods["tuned"]
    container = pod["spec"]["containers"][0]
    assert names.VLLM_UTILIZATION_ARG in container["args"]
    assert "0.95" not in container["args"]
    assert container["resources"]["limits"] == {names.RESOURCE_GPU_MEMORY: "20"}
    assert pod["spec"]["schedulerName"] == names.SCHEDULER_NAME
    # vLLM ran with the utilization Allocate computed for a 20 GiB grant on its card.
    card = next(c for c in fleet.parse(FLEET).cards if c.uuid == tuned.card_uuid)
    expected = sizing.utilization(
        granted_bytes=20 * GI, reserve_bytes=config.Settings().reserve_bytes,
        cuda_total_bytes=card.model.cuda_total_bytes,
    )
    assert tuned.utilization == str(expected)
    assert tuned.used_bytes <= 20 * GI


def test_every_scheduling_cycle_went_through_the_extender(evidence: Evidence) -> None:
    # kube-scheduler's own NodeResourcesFit counts the node's total of the resource first: a pod
    # larger than every node's total never reaches the extender (the embedded cycle skips it).
    cycles = sum(
        1 for r in evidence.results.values()
        if isinstance(r, Placement)
        or (r.stage in ("scheduling", "binding")
            and f"Insufficient {names.RESOURCE_GPU_MEMORY}" not in r.reason)
    )
    assert evidence.calls["filter"] == cycles
    placed = sum(isinstance(r, Placement) for r in evidence.results.values())
    assert evidence.calls["bind"] == placed
    assert evidence.api_requests.get("POST pods/binding", 0) == evidence.calls["bind"]


def test_a_refusing_filter_stops_placement(evidence: Evidence) -> None:
    after = evidence.after_fault
    assert isinstance(after, Failure)
    assert after.stage == "scheduling"
    assert "unhealthy" in after.reason


def test_the_simulator_calls_the_webhook_paths_without_loading_kopf() -> None:
    # The paths come from the webhook's own module (its handlers are registered under them); the
    # simulator imports it, not the kopf glue.
    code = "import sys, gpushare.simulator.cluster; print('kopf' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False"
    called = {
        hook["clientConfig"]["service"]["path"]
        for path in sorted(WEBHOOK_MANIFESTS.glob("*-webhook-configuration.yaml"))
        for hook in yaml.safe_load(path.read_text())["webhooks"]
    }
    assert called == {f"/{paths.MUTATE_PODS}", f"/{paths.VALIDATE_INFERENCE_SERVICES}"}
