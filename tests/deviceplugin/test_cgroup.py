"""``cgroup`` isolation and ``auto``: support detected per card, the limit carried by Allocate and
set by the agent through NVML, the choice shown in the node report and the exporter.

Only the fake NVML runs here: no driver available to the tests has per-cgroup limits (the NVML
call itself is pinned in test_nvml_contract.py).
"""

import asyncio
from pathlib import Path

import pytest

from gpushare.core import errors, names
from gpushare.core.config import IsolationSetting
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import cgrouplimit, mps, watchdog
from gpushare.deviceplugin.nvml import CardReading
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    AgentFactory,
    StaticPods,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.deviceplugin.test_watchdog import CID, UID, vllm_pod, write_proc


def reading(uuid: str, *, limits: bool, error: str | None = None) -> CardReading:
    return CardReading(CardUUID(uuid), 0, "H100", 80 * GI, 0, 0, 80 * GI, None, error, limits)


@pytest.mark.parametrize(
    ("cards", "v2", "setting", "expected", "why"),
    [
        ([reading(CARD_A, limits=True), reading(CARD_B, limits=True)], True, "auto", "cgroup", ""),
        (
            [reading(CARD_A, limits=True), reading(CARD_B, limits=False)],
            True,
            "auto",
            "mps",
            CARD_B,
        ),
        ([reading(CARD_A, limits=True)], False, "auto", "mps", "cgroup v2"),
        ([], True, "auto", "mps", "no card"),
        ([reading(CARD_A, limits=False, error="GPU is lost")], True, "auto", "mps", "no card"),
        ([reading(CARD_A, limits=False)], True, "mps-shared", "mps-shared", CARD_A),
        ([reading(CARD_A, limits=False)], True, "none", "none", CARD_A),
    ],
    ids=[
        "every-card-has-limits",
        "one-card-lacks-them",
        "cgroup-v1",
        "no-card",
        "only-a-broken-card",
        "a-set-mode-stays",
        "none-stays",
    ],
)
def test_auto_picks_the_strongest_isolation_the_node_supports(
    cards: list[CardReading], v2: bool, setting: IsolationSetting, expected: str, why: str
) -> None:
    reason = cgrouplimit.unsupported(cards, cgroup_v2=v2)
    assert (reason is None) == (why == "")
    assert why in (reason or "")
    assert cgrouplimit.choose(setting, reason=reason) == expected


def test_the_cgroup_v2_hierarchy_is_recognised(tmp_path: Path) -> None:
    assert not cgrouplimit.cgroup_v2(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert cgrouplimit.cgroup_v2(tmp_path)


def limited_cards() -> list[dict[str, object]]:
    return [card(CARD_A, 0, memory_limits=True), card(CARD_B, 1, memory_limits=True)]


@pytest.mark.parametrize("isolation", ["auto", "cgroup"])
async def test_allocate_carries_the_limit_and_a_utilization_of_the_grant(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, isolation: str
) -> None:
    write_fake(nvml_file, limited_cards())
    agent = make_agent(isolation=isolation)
    assert agent.mode.name == "cgroup"
    async with running(agent, kubelet):
        response = await kubelet.admit("ns", "pod", "c", 20)
    envs = dict(response.envs)
    assert envs[names.ENV_GPU_MEMORY_LIMIT] == envs[names.ENV_GPU_MEMORY_REQUEST] == "20480"
    # CUDA reports the limit as the device's total: (20 GiB - 716 MiB) / 20 GiB = 0.96503...
    assert envs[names.ENV_VLLM_UTILIZATION] == "0.9650"
    assert envs[names.ENV_GRANTED_BYTES] == str(20 * GI)
    assert names.ENV_MPS_PIPE_DIRECTORY not in envs and names.ENV_MPS_MEM_LIMIT not in envs
    assert list(response.mounts) == []
    # NVIDIA's hooks (the limit's among them) run for CDI devices, so the card is named as one.
    assert [d.name for d in response.cdi_devices] == [
        f"nvidia.com/gpu={envs['GPUSHARE_CARD_UUID']}"
    ]


async def test_auto_falls_back_to_mps_where_a_card_lacks_limits(
    make_agent: AgentFactory, nvml_file: Path
) -> None:
    write_fake(nvml_file, [card(CARD_A, 0, memory_limits=True), card(CARD_B, 1)])
    assert make_agent(isolation="auto").mode.name == "mps"
    write_fake(nvml_file, limited_cards())
    assert make_agent(isolation="auto", cgroup_v2=False).mode.name == "mps"


async def test_cgroup_set_where_unsupported_grants_nothing_and_says_why(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    agent = make_agent(isolation="cgroup")
    assert agent.mode.name == "cgroup"
    assert "no per-cgroup memory limits" in (agent.mode.down_reason() or "")
    async with running(agent, kubelet):
        await kubelet.wait_for(lambda: "Healthy" not in kubelet.devices.values())


async def test_the_agent_limits_the_cgroup_of_each_granted_process_once(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path, short_tmp: Path
) -> None:
    write_fake(nvml_file, limited_cards())
    agent = make_agent(
        isolation="cgroup",
        pods=StaticPods([vllm_pod()]),
        locator=watchdog.CgroupLocator(short_tmp / "proc"),
    )
    assert isinstance(agent.mode, cgrouplimit.CgroupLimit)
    write_proc(short_tmp / "proc", 4242, UID, CID)
    cgroup = f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    async with running(agent, kubelet):
        await kubelet.admit("ns", "bloom", "kserve-container", 10)
        await agent.refresh_holdings()
        write_fake(
            nvml_file,
            limited_cards(),
            processes=[{"pid": 4242, "card": CARD_A, "used": "2Gi", "kind": "cuda"}],
        )
        for _ in range(200):
            if agent.mode.limited:
                break
            await asyncio.sleep(0.02)
        await agent.poll()
        await agent.published()
    assert agent.nvml.limits == {(CARD_A, cgroup): (10 * GI, 10 * GI)}  # type: ignore[attr-defined]
    assert agent.mode.limited == {(CARD_A, cgroup): 10 * GI}


async def test_the_node_report_and_the_exporter_show_the_isolation(
    make_agent: AgentFactory, nvml_file: Path
) -> None:
    write_fake(nvml_file, [card(CARD_A, 0, memory_limits=True), card(CARD_B, 1)])
    agent = make_agent(isolation="auto")
    await agent.poll()
    await agent.published()
    assert [(c.uuid, c.memory_limits) for c in agent.card_reports()] == [
        (CARD_A, True),
        (CARD_B, False),
    ]
    registry = agent.metrics.registry
    assert (
        registry.get_sample_value(
            "gpushare_node_isolation", {"node": "gpu-node", "isolation": "mps"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "gpushare_card_memory_limits_supported",
            {
                "node": "gpu-node",
                "gpu_uuid": CARD_A,
                "gpu_index": "0",
                "model": "NVIDIA H100 80GB HBM3",
            },
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "gpushare_card_memory_limits_supported",
            {
                "node": "gpu-node",
                "gpu_uuid": CARD_B,
                "gpu_index": "1",
                "model": "NVIDIA H100 80GB HBM3",
            },
        )
        == 0
    )


def test_mps_make_needs_nvml_for_cgroup(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="needs NVML"):
        mps.make("cgroup", tmp_path)
