"""The exporter, scraped over HTTP and parsed with prometheus-client's parser."""

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import names
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.watchdog import CgroupLocator
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    H100_TOTAL,
    AgentFactory,
    StaticPods,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.deviceplugin.test_watchdog import CID, UID, write_proc

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


@pytest.fixture
def exporter() -> Iterator[tuple[prometheus_client.CollectorRegistry, int]]:
    registry = prometheus_client.CollectorRegistry()
    server, thread = prometheus_client.start_http_server(0, "127.0.0.1", registry=registry)
    yield registry, server.server_port
    server.shutdown()
    thread.join()


async def test_cards_containers_and_registration_are_exported(
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    nvml_file: Path,
    short_tmp: Path,
    exporter: tuple[prometheus_client.CollectorRegistry, int],
) -> None:
    registry, port = exporter
    pod = PodInfo(
        namespace="ns",
        name="bloom",
        uid=UID,
        phase="Running",
        annotations={names.ANNOTATION_CARD_UUID: CARD_A},
    )
    pods = StaticPods([pod])
    agent = make_agent(
        isolation="none",
        pods=pods,
        locator=CgroupLocator(short_tmp / "proc"),
        registry=registry,
        overuse_grace_seconds=0,
    )
    async with running(agent, kubelet):
        await kubelet.admit("ns", "bloom", "kserve-container", 4)
        pods.items = [
            PodInfo(
                namespace="ns",
                name="bloom",
                uid=UID,
                phase="Running",
                annotations=pod.annotations,
                container_ids={CID: "kserve-container"},
            )
        ]
        write_proc(short_tmp / "proc", 4242, UID, CID)
        write_fake(
            nvml_file,
            [card(CARD_A, 0, utilization=0.25), card(CARD_B, 1)],
            processes=[{"pid": 4242, "card": CARD_A, "used": "5Gi"}],
        )
        for _ in range(100):
            samples = await asyncio.to_thread(scrape, port)
            if (
                "gpushare_grant_violations_total",
                frozenset(
                    {
                        ("node", "gpu-node"),
                        ("namespace", "ns"),
                        ("pod", "bloom"),
                        ("container", "kserve-container"),
                    }
                ),
            ) in samples:
                break
            await asyncio.sleep(0.05)
    a = {"gpu_uuid": CARD_A, "gpu_index": "0", "node": "gpu-node", "model": "NVIDIA H100 80GB HBM3"}
    assert value(samples, "gpushare_card_total_bytes", **a) == H100_TOTAL
    assert value(samples, "gpushare_card_used_bytes", **a) == 5 * GI
    assert value(samples, "gpushare_card_granted_bytes", **a) == 4 * GI
    assert value(samples, "gpushare_card_utilization_ratio", **a) == 0.25
    assert value(samples, "gpushare_card_healthy", gpu_uuid=CARD_B) == 1
    c = {
        "namespace": "ns",
        "pod": "bloom",
        "container": "kserve-container",
        "gpu_uuid": CARD_A,
        "gpu_index": "0",
    }
    assert value(samples, "gpushare_container_used_bytes", **c) == 5 * GI
    assert value(samples, "gpushare_container_granted_bytes", **c) == 4 * GI
    assert value(samples, "gpushare_grant_violations_total", pod="bloom") == 1
    assert value(samples, "gpushare_device_plugin_registered", node="gpu-node") == 1
    assert value(samples, "gpushare_device_plugin_registrations_total") == 1
    assert value(samples, "gpushare_device_plugin_allocations_total", result="ok") == 1
    assert value(samples, "gpushare_agent_poll_duration_seconds_count") > 0
