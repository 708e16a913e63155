"""The real plugin driven by a test kubelet over unix sockets: registration, the device list,
health changes, preferences, Allocate's environment, and a kubelet restart."""

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpushare.core import allocations, names
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, pod_key
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
from tests.deviceplugin.kubelet import NewPod, TestKubelet

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


def bound_pod(
    name: str,
    cards: dict[str, str],
    units: int,
    *,
    created: int,
    bind: int,
    annotations: dict[str, str] | None = None,
) -> tuple[PodInfo, NewPod]:
    """A pod bound by the extender (``cards``: container to card), as the plugin and kubelet see
    it; times are seconds into 2030."""
    index = {CARD_A: 0, CARD_B: 1}
    recorded = [
        Allocation(c, CardUUID(u), index[u], H100_CUDA_TOTAL, units * GI) for c, u in cards.items()
    ]
    when = datetime(2030, 1, 1, tzinfo=UTC)
    info = PodInfo(
        namespace="ns",
        name=name,
        annotations={
            **allocations.encode(recorded, bind_time=when + timedelta(seconds=bind)),
            **(annotations or {}),
        },
        requests=dict.fromkeys(cards, units),
        created=when + timedelta(seconds=created),
    )
    new = NewPod("ns", name, info.created, tuple((c, units) for c in cards))
    return info, new


async def test_the_hand_off_follows_kubelets_admission_order(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    # Bound to B first, then to A; but created the other way round, which is the order kubelet
    # admits them in. Each must get the card the extender chose for it.
    late, late_new = bound_pod("created-late", {"c": CARD_B}, 20, created=5, bind=1)
    early, early_new = bound_pod("created-early", {"c": CARD_A}, 20, created=2, bind=3)
    other, other_new = bound_pod("other-size", {"c": CARD_B}, 10, created=9, bind=0)
    pods = StaticPods([late, early, other])
    async with running(make_agent(isolation="none", pods=pods), kubelet):
        answers = await kubelet.admit_batch([late_new, other_new, early_new])
    assert {name: a.envs[names.ENV_VISIBLE_DEVICES] for (name, _), a in answers.items()} == {
        "created-early": CARD_A,
        "created-late": CARD_B,
        "other-size": CARD_B,
    }


async def test_each_memory_container_of_a_pod_gets_its_own_card(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    two, two_new = bound_pod("two", {"vllm": CARD_B, "sidecar": CARD_A}, 8, created=1, bind=1)
    async with running(make_agent(isolation="none", pods=StaticPods([two])), kubelet):
        answers = await kubelet.admit_batch([two_new])
    assert answers["two", "vllm"].envs[names.ENV_VISIBLE_DEVICES] == CARD_B
    assert answers["two", "sidecar"].envs[names.ENV_VISIBLE_DEVICES] == CARD_A


async def test_a_terminating_pending_pod_is_not_the_one_admitted(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    going, _ = bound_pod("going", {"c": CARD_A}, 6, created=1, bind=1)
    staying, staying_new = bound_pod("staying", {"c": CARD_B}, 6, created=2, bind=2)
    pods = StaticPods([dataclasses.replace(going, deleting=True), staying])
    async with running(make_agent(isolation="none", pods=pods), kubelet):
        answers = await kubelet.admit_batch([staying_new])
    assert answers["staying", "c"].envs[names.ENV_VISIBLE_DEVICES] == CARD_B


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


SHARE = names.ANNOTATION_COMPUTE_SHARE


async def test_a_compute_share_is_the_mps_daemons_ceiling_and_the_clients_setting(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    capped, capped_new = bound_pod(
        "capped", {"c": CARD_B}, 12, created=1, bind=1, annotations={SHARE: "30%"}
    )
    plain, plain_new = bound_pod("plain", {"c": CARD_A}, 12, created=2, bind=2)
    agent = make_agent(isolation="mps", pods=StaticPods([capped, plain]))
    async with running(agent, kubelet):
        answers = await kubelet.admit_batch([capped_new, plain_new])
    capped_env, plain_env = answers["capped", "c"].envs, answers["plain", "c"].envs
    assert capped_env[names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE] == "30"
    assert names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE not in plain_env
    capped_pipe = capped_env[names.ENV_MPS_PIPE_DIRECTORY]
    lines = mps_control.lines()
    # Set before any client connects, after the memory limit; the other daemon has none.
    assert lines.index(f"{capped_pipe} set_default_active_thread_percentage 30") > lines.index(
        f"{capped_pipe} set_default_device_pinned_mem_limit 0 12288M"
    )
    assert not [line for line in lines if "active_thread" in line and capped_pipe not in line]


async def test_a_restarted_daemon_keeps_its_compute_share(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    capped, capped_new = bound_pod(
        "capped", {"c": CARD_A}, 8, created=1, bind=1, annotations={SHARE: "25"}
    )
    agent = make_agent(isolation="mps", pods=StaticPods([capped]))
    async with running(agent, kubelet):
        answers = await kubelet.admit_batch([capped_new])
        pipe = answers["capped", "c"].envs[names.ENV_MPS_PIPE_DIRECTORY]
        mps_control.kill_all()
        assert kubelet.stub is not None
        ids = list(answers["capped", "c"].devices)
        await kubelet.stub.PreStartContainer(dp.PreStartContainerRequest(devices_ids=ids))
    # The daemon came back once (by PreStartContainer, or by the poll that found it dead first:
    # never both), and each start of it was followed by the pod's share.
    ours = [line.removeprefix(f"{pipe} ") for line in mps_control.lines() if line.startswith(pipe)]
    starts = [i for i, line in enumerate(ours) if line.startswith("start ")]
    shares = [i for i, line in enumerate(ours) if line.endswith("active_thread_percentage 25")]
    assert len(starts) == 2, ours
    assert len(shares) == 2, ours
    assert all(start < share for start, share in zip(starts, shares, strict=True)), ours


async def test_under_mps_shared_the_share_is_the_clients_own_setting(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    capped, capped_new = bound_pod(
        "capped", {"c": CARD_A}, 8, created=1, bind=1, annotations={SHARE: "40"}
    )
    async with running(make_agent(isolation="mps-shared", pods=StaticPods([capped])), kubelet):
        answers = await kubelet.admit_batch([capped_new])
    assert answers["capped", "c"].envs[names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE] == "40"
    assert not [line for line in mps_control.lines() if "active_thread" in line]


async def test_a_share_the_webhook_would_refuse_sets_nothing(
    make_agent: AgentFactory, kubelet: TestKubelet, mps_control: FakeControl
) -> None:
    odd, odd_new = bound_pod(
        "odd", {"c": CARD_A}, 8, created=1, bind=1, annotations={SHARE: "all of it"}
    )
    async with running(make_agent(isolation="mps", pods=StaticPods([odd])), kubelet):
        answers = await kubelet.admit_batch([odd_new])
    assert names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE not in answers["odd", "c"].envs
    assert not [line for line in mps_control.lines() if "active_thread" in line]


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
        kubelet.release(pod_key("ns", "pod"))
        await agent.reconcile()
        assert f"{pipe} quit" not in mps_control.lines()  # kubelet may not list it yet: grace
        now[0] += mps.RELEASE_GRACE_SECONDS + 1
        await agent.reconcile()
        assert f"{pipe} quit" in mps_control.lines()
        assert agent.mode.servers_on(CARD_A) == 0  # type: ignore[arg-type]


async def test_a_card_that_vanishes_from_nvml_goes_unhealthy(
    make_agent: AgentFactory, kubelet: TestKubelet, nvml_file: Path
) -> None:
    async with running(make_agent(isolation="none"), kubelet) as agent:
        write_fake(nvml_file, [card(CARD_A, 0)])
        await kubelet.wait_for(
            lambda: all(
                h == "Unhealthy" for d, h in kubelet.devices.items() if d.startswith(CARD_B)
            )
        )
        assert len(kubelet.devices) == 2 * UNITS_PER_H100  # its IDs stay listed, as Unhealthy
        await agent.published()
        (report_b,) = [c for c in agent.card_reports() if c.uuid == CARD_B]
        assert not report_b.healthy and report_b.free_bytes == 0
        write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)])
        await kubelet.wait_for(lambda: set(kubelet.devices.values()) == {"Healthy"})
