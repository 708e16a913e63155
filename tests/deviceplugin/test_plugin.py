"""The real plugin driven by a test kubelet over unix sockets: registration, the device list,
health changes, preferences, Allocate's environment, and a kubelet restart."""

import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpushare import names
from gpushare.deviceplugin import devices, mps
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from gpushare.deviceplugin.pods import PodInfo
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    H100_CUDA_TOTAL,
    AgentFactory,
    FakeControl,
    StaticPods,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet

UNITS_PER_H100 = H100_CUDA_TOTAL // GI  # 79


async def test_registers_the_resource_with_its_options(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        (request,) = kubelet.registrations
        assert request.version == "v1beta1"
        assert request.resource_name == names.RESOURCE_GPU_MEMORY
        assert request.endpoint == "gpushare.sock"
        assert request.options.pre_start_required
        assert request.options.get_preferred_allocation_available
        assert kubelet.options is not None and kubelet.options.get_preferred_allocation_available


async def test_lists_one_id_per_unit_of_each_card(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        ids = sorted(kubelet.devices, key=devices.sort_key)
        assert len(ids) == 2 * UNITS_PER_H100
        assert ids[0] == f"{CARD_A}-0" and ids[-1] == f"{CARD_B}-{UNITS_PER_H100 - 1}"
        assert all(len(i) <= devices.MAX_ID_LENGTH for i in ids)
        assert set(kubelet.devices.values()) == {"Healthy"}


async def test_keeps_room_for_the_next_mps_server(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    # 79.18 GiB: 79 units leave 184 MiB, room for two 66 MiB servers; the third daemon's server
    # would not fit, so after two allocations on card A its last free unit is withheld.
    async with running(make_agent(isolation="mps"), kubelet) as agent:
        assert list(kubelet.devices.values()).count("Unhealthy") == 0
        await kubelet.admit("ns", "one", "c", 10)
        await kubelet.admit("ns", "two", "c", 10)
        await kubelet.wait_for(lambda: list(kubelet.devices.values()).count("Unhealthy") == 1)
        (withheld,) = [d for d, h in kubelet.devices.items() if h == "Unhealthy"]
        assert devices.parse(withheld) == (CARD_A, UNITS_PER_H100 - 1)
        assert agent.mode.servers_on(CARD_A) == 2  # type: ignore[arg-type]


async def test_a_card_fault_is_resent_and_so_is_its_recovery(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1, error="GPU is lost")])
        await kubelet.wait_for(
            lambda: all(
                h == "Unhealthy" for d, h in kubelet.devices.items() if d.startswith(CARD_B)
            )
        )
        assert all(h == "Healthy" for d, h in kubelet.devices.items() if d.startswith(CARD_A))
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)])
        await kubelet.wait_for(lambda: set(kubelet.devices.values()) == {"Healthy"})


async def test_a_critical_xid_makes_the_card_unhealthy(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        write_fake(
            nvml_file,
            [card(CARD_A, 0), card(CARD_B, 1)],
            xid=[{"card": CARD_A, "xid": 13}, {"card": CARD_A, "xid": 48}],
        )
        await kubelet.wait_for(
            lambda: all(
                h == "Unhealthy" for d, h in kubelet.devices.items() if d.startswith(CARD_A)
            )
        )
        assert all(h == "Healthy" for d, h in kubelet.devices.items() if d.startswith(CARD_B))


def bound_pod(name: str, card_uuid: str, units: int, bind_time: str) -> PodInfo:
    return PodInfo(
        namespace="ns",
        name=name,
        annotations={
            names.ANNOTATION_CARD_UUID: card_uuid,
            names.ANNOTATION_GRANTED_BYTES: str(units * GI),
            names.ANNOTATION_BIND_TIME: bind_time,
        },
        requests={"c": units},
    )


async def test_preference_follows_the_oldest_waiting_pod_of_that_size(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    pods = StaticPods(
        [
            bound_pod("late", CARD_A, 20, "2030-01-01T00:00:03Z"),
            bound_pod("early", CARD_B, 20, "2030-01-01T00:00:01Z"),
            bound_pod("other-size", CARD_A, 10, "2030-01-01T00:00:00Z"),
        ]
    )
    async with running(make_agent(isolation="none", pods=pods), kubelet):
        first = await kubelet.admit("ns", "early", "c", 20)
        assert first.envs[names.ENV_VISIBLE_DEVICES] == CARD_B
        # "early" now holds devices (PodResources says so): the next 20-unit pod is "late".
        second = await kubelet.admit("ns", "late", "c", 20)
        assert second.envs[names.ENV_VISIBLE_DEVICES] == CARD_A
        third = await kubelet.admit("ns", "other-size", "c", 10)
        assert third.envs[names.ENV_VISIBLE_DEVICES] == CARD_A
        held_b = kubelet.assigned[("ns", "early")]["c"][1]
        assert {devices.parse(d)[0] for d in held_b} == {CARD_B} and len(held_b) == 20


async def test_allocate_returns_the_contract_environment_under_mps(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    agent = make_agent(isolation="mps", cdi=True)
    async with running(agent, kubelet):
        response = await kubelet.admit("ns", "pod", "c", 20)
    envs = dict(response.envs)
    pipe = envs[names.ENV_MPS_PIPE_DIRECTORY]
    assert envs[names.ENV_VISIBLE_DEVICES] == CARD_A
    assert envs[names.ENV_CARD_UUID] == CARD_A
    assert envs[names.ENV_GRANTED_BYTES] == str(20 * GI)
    # (20 GiB - 716 MiB reserve) / 79.18 GiB, rounded down to 4 places
    assert envs[names.ENV_VLLM_UTILIZATION] == "0.2437"
    assert envs[names.ENV_MPS_MEM_LIMIT] == f"{CARD_A}=20480M"
    assert pipe.startswith(str(agent.settings.agent.mps_root))
    assert [(m.host_path, m.container_path) for m in response.mounts] == [(pipe, pipe)]
    assert [d.name for d in response.cdi_devices] == [f"nvidia.com/gpu={CARD_A}"]
    assert f"{pipe} start CUDA_VISIBLE_DEVICES={CARD_A}" in mps_control.lines()
    assert f"{pipe} set_default_device_pinned_mem_limit 0 20480M" in mps_control.lines()


async def test_allocate_refuses_ids_that_span_cards(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        assert kubelet.stub is not None
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.stub.Allocate(
                dp.AllocateRequest(
                    container_requests=[
                        dp.ContainerAllocateRequest(devices_ids=[f"{CARD_A}-0", f"{CARD_B}-0"])
                    ]
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "span 2 cards" in (caught.value.details() or "")


async def test_no_grant_while_the_mps_daemon_cannot_start(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    mps_control.fail_flag.touch()
    async with running(make_agent(isolation="mps"), kubelet):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.admit("ns", "pod", "c", 4)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "exited with status 1" in (caught.value.details() or "")


async def test_no_device_is_healthy_without_the_mps_binaries(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    mps_control.path.unlink()
    async with running(make_agent(isolation="mps-shared"), kubelet):
        assert set(kubelet.devices.values()) == {"Unhealthy"}


async def test_registers_again_within_five_seconds_of_a_kubelet_restart(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    async with running(make_agent(isolation="none"), kubelet) as agent:
        before = len(kubelet.registrations)
        await kubelet.restart()
        started = time.monotonic()
        await kubelet.wait_for(
            lambda: len(kubelet.registrations) > before and bool(kubelet.devices), 5.0
        )
        assert time.monotonic() - started < 5.0
        assert len(kubelet.devices) == 2 * UNITS_PER_H100
        response = await kubelet.admit("ns", "after-restart", "c", 2)
        assert response.envs[names.ENV_GRANTED_BYTES] == str(2 * GI)
        registrations = "gpushare_device_plugin_registrations_total"
        assert agent.metrics.registry.get_sample_value(registrations, {"node": "gpu-node"}) == 2


async def test_stops_an_mps_daemon_once_its_pod_is_gone(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    now = [1000.0]
    agent = make_agent(isolation="mps", clock=lambda: now[0])
    async with running(agent, kubelet):
        response = await kubelet.admit("ns", "pod", "c", 4)
        pipe = response.envs[names.ENV_MPS_PIPE_DIRECTORY]
        kubelet.release("ns", "pod")
        await agent.reconcile()
        assert f"{pipe} quit" not in mps_control.lines()  # kubelet may not list it yet: grace
        now[0] += mps.RELEASE_GRACE_SECONDS + 1
        await agent.reconcile()
        assert f"{pipe} quit" in mps_control.lines()
        assert agent.mode.servers_on(CARD_A) == 0  # type: ignore[arg-type]
