"""Escapes: how each process of a granted pod holds its card, judged on the poll that sees it.

The fake NVML lists each process with its kind (a plain CUDA context, an MPS client, an MPS server),
as the real backend reads it from NVML's two process lists and the process's name.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest

from gpushare.core.config import Isolation
from gpushare.core.ids import CardUUID, pod_key
from gpushare.deviceplugin import escapes, watchdog
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.nvml import ProcessKind, ProcessUsage
from gpushare.deviceplugin.pods import PodInfo
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    MI,
    AgentFactory,
    StaticPods,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.deviceplugin.test_watchdog import CID, CID2, UID, vllm_pod, write_proc

SLACK = 512 * MI
GRANTS = {(pod_key("ns", "bloom"), "kserve-container"): (CardUUID(CARD_A), 10 * GI)}
OTHER_UID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


OUTSIDE_MPS: Final = {"pid": 4242, "card": CARD_A, "used": "2Gi", "kind": "cuda"}
"""A plain CUDA process of bloom's vLLM container under ``isolation: mps``: an escape."""
ESCAPE_LABELS: Final = {
    "node": "gpu-node",
    "namespace": "ns",
    "pod": "bloom",
    "container": "kserve-container",
    "escape": "outside-mps",
}


def held_by_bloom(kubelet: TestKubelet, short_tmp: Path, nvml_file: Path) -> list[dict[str, Any]]:
    """Kubelet holds 10 units of card A for bloom's vLLM container, whose process 4242 escapes
    on it; what the fake NVML lists."""
    kubelet.hold(pod_key("ns", "bloom"), "kserve-container", [f"{CARD_A}-{u}" for u in range(10)])
    write_proc(short_tmp / "proc", 4242, UID, CID)
    write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], processes=[OUTSIDE_MPS])
    return [OUTSIDE_MPS]


def escapes_counted(agent: Agent) -> float | None:
    """The agent's count of outside-mps escapes by bloom's vLLM container."""
    return agent.metrics.registry.get_sample_value(
        "gpushare_isolation_escapes_total", ESCAPE_LABELS
    )


def bloom_agent(make_agent: AgentFactory, short_tmp: Path, **settings: Any) -> Agent:
    """An agent under ``isolation: mps`` that knows bloom's pod and reads ``short_tmp/proc``."""
    return make_agent(
        isolation="mps",
        pods=StaticPods([vllm_pod()]),
        locator=watchdog.CgroupLocator(short_tmp / "proc"),
        **settings,
    )


@contextlib.asynccontextmanager
async def polling(make_agent: AgentFactory, short_tmp: Path) -> AsyncIterator[Agent]:
    """:func:`bloom_agent`, polled by the test, its kubelet client closed afterwards."""
    agent = bloom_agent(make_agent, short_tmp)
    try:
        yield agent
    finally:
        if agent.podresources is not None:
            await agent.podresources.close()


def located(tmp_path: Path) -> watchdog.CgroupLocator:
    """Processes 100-101 in the vLLM container, 102 in its sidecar, 200 in a pod with no grant."""
    for pid, uid, cid in ((100, UID, CID), (101, UID, CID), (102, UID, CID2)):
        write_proc(tmp_path, pid, uid, cid)
    write_proc(tmp_path, 200, OTHER_UID, "c" * 64)
    return watchdog.CgroupLocator(tmp_path)


def other_pod() -> PodInfo:
    return PodInfo(
        namespace="ns",
        name="plain",
        uid=OTHER_UID,
        phase="Running",
        container_ids={"c" * 64: "main"},
    )


def process(pid: int, kind: ProcessKind, used: int = GI) -> ProcessUsage:
    return ProcessUsage(pid, CardUUID(CARD_A), used, kind)


def find(tmp_path: Path, isolation: Isolation, *processes: ProcessUsage) -> list[Any]:
    return [
        (f.container, f.escape, f.pids)
        for f in escapes.find(
            processes,
            isolation=isolation,
            locator=located(tmp_path),
            pods=[vllm_pod(), other_pod()],
            grants=GRANTS,
            slack_bytes=SLACK,
        )
    ]


@pytest.mark.parametrize(
    ("isolation", "processes", "expected"),
    [
        ("mps", [process(100, "mps-client", 9 * GI)], []),
        ("mps", [process(100, "cuda")], [("kserve-container", "outside-mps", (100,))]),
        ("mps-shared", [process(102, "cuda")], [("sidecar", "outside-mps", (102,))]),
        (
            "mps",
            [process(100, "mps-server", 66 * MI), process(101, "mps-client", 30 * GI)],
            [
                ("kserve-container", "own-mps-daemon", (100,)),
                ("kserve-container", "over-limit", (101,)),
            ],
        ),
        ("mps-shared", [process(100, "mps-client", 10 * GI + SLACK)], []),
        (
            "mps-shared",
            [process(100, "mps-client", 10 * GI + SLACK + 1)],
            [("kserve-container", "over-limit", (100,))],
        ),
        # Each process under the daemon's per-process cap: over-use (the watchdog's), no escape.
        ("mps", [process(100, "mps-client", 6 * GI), process(101, "mps-client", 6 * GI)], []),
        ("mps", [process(100, "unknown", 30 * GI)], []),
        ("mps", [process(200, "cuda"), process(999, "cuda")], []),
        ("none", [process(100, "cuda", 30 * GI), process(101, "mps-server")], []),
        ("cgroup", [process(100, "cuda", 6 * GI), process(101, "cuda", 4 * GI)], []),
        (
            "cgroup",
            [process(100, "cuda", 6 * GI), process(101, "cuda", 5 * GI)],
            [("kserve-container", "over-limit", (100, 101))],
        ),
    ],
    ids=[
        "mps-client-within-grant",
        "context-outside-mps",
        "sidecar-outside-shared-mps",
        "own-daemon-and-its-unlimited-client",
        "shared-client-within-slack",
        "shared-client-past-slack",
        "two-clients-each-under-the-cap",
        "kind-unknown-is-not-judged",
        "pods-without-grant-and-strangers-are-not-judged",
        "nothing-is-an-escape-without-isolation",
        "cgroup-container-within-its-limit",
        "cgroup-container-past-its-limit",
    ],
)
def test_each_escape_is_found_and_nothing_else(
    tmp_path: Path, isolation: Isolation, processes: list[ProcessUsage], expected: list[Any]
) -> None:
    assert sorted(find(tmp_path, isolation, *processes)) == sorted(expected)


def test_the_message_names_the_container_the_process_and_the_escape(tmp_path: Path) -> None:
    (finding,) = escapes.find(
        [process(100, "cuda", 3 * GI)],
        isolation="mps",
        locator=located(tmp_path),
        pods=[vllm_pod()],
        grants=GRANTS,
        slack_bytes=SLACK,
    )
    message = finding.describe()
    assert finding.key == "ns/bloom/kserve-container"
    for part in ("container kserve-container", "outside its MPS daemon", "100", CARD_A, "3 GiB"):
        assert part in message, part


async def test_an_escape_is_acted_on_once_per_episode(tmp_path: Path) -> None:
    seen: list[str] = []
    guard = escapes.Guard(None, node="n", action="evict", on_escape=lambda f: seen.append(f.key))
    outside = escapes.find(
        [process(100, "cuda")],
        isolation="mps",
        locator=located(tmp_path),
        pods=[vllm_pod()],
        grants=GRANTS,
        slack_bytes=SLACK,
    )
    assert await guard.check(outside) == outside
    assert await guard.check(outside) == []
    assert await guard.check([]) == []
    assert await guard.check(outside) == outside
    assert seen == ["ns/bloom/kserve-container"] * 2


async def test_the_agent_catches_an_escape_on_its_next_poll_without_grace(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, short_tmp: Path
) -> None:
    agent = bloom_agent(make_agent, short_tmp, overuse_grace_seconds=3600)
    write_proc(short_tmp / "proc", 4242, UID, CID)
    async with running(agent, kubelet):
        await kubelet.admit("ns", "bloom", "kserve-container", 10)
        await agent.refresh_holdings()
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], processes=[OUTSIDE_MPS])
        for _ in range(200):
            count = escapes_counted(agent)
            if count:
                break
            await asyncio.sleep(0.02)
    assert count == 1


async def test_a_process_of_a_pod_kubelet_has_not_listed_yet_is_judged_on_the_first_poll(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, short_tmp: Path
) -> None:
    # Allocate has answered and the container started before the agent's next reconcile: the poll
    # that first sees its process asks kubelet for the holdings itself.
    held_by_bloom(kubelet, short_tmp, nvml_file)
    async with polling(make_agent, short_tmp) as agent:
        await agent.poll()
        await agent.published()
    assert escapes_counted(agent) == 1


async def test_a_failed_nvml_reading_does_not_report_an_escape_twice(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, short_tmp: Path
) -> None:
    escaping = held_by_bloom(kubelet, short_tmp, nvml_file)
    async with polling(make_agent, short_tmp) as agent:
        await agent.poll()
        await agent.published()
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], error="driver gone")
        await agent.poll()
        await agent.published()
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], processes=escaping)
        await agent.poll()
        await agent.published()
    assert escapes_counted(agent) == 1
