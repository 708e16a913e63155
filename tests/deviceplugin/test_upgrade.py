"""Replacing the device plugin's pod under running servers: their MPS daemons live outside the
plugin's cgroup, so the container runtime's teardown of the old pod leaves them running, and the
new plugin adopts them with their limits while the clients keep their memory.

The runtime is modelled by what it does to a pod that shares the host's PID namespace: it kills
every process left in the pod's cgroup. Here that is every daemon the old plugin started that is not
listed in the cgroup named by ``--mps-cgroup`` (a folder laid out as a cgroup v2 hierarchy).
"""

import contextlib
import os
import signal
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpushare.core import names
from gpushare.deviceplugin import mps
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    AgentFactory,
    FakeControl,
    allocate_request,
    card,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet


def tear_down_pod(control: FakeControl, kept: Path) -> None:
    """What the runtime does to the old plugin pod: kill the daemons still in its cgroup."""
    outside = set((kept / "cgroup.procs").read_text().split()) if kept.exists() else set()
    started = (control.log.with_suffix(".log.pids")).read_text().split()
    for pid in started:
        if pid not in outside:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def limits(root: Path) -> dict[str, tuple[str, str]]:
    """Each daemon's pipe folder: (its pid, the default limit it hands a new client)."""
    return {
        pipe.name: (
            (pipe / mps.PID_FILE).read_text().strip(),
            (pipe / "default-limit").read_text().strip(),
        )
        for pipe in root.iterdir()
        if (pipe / mps.GRANT_FILE).exists()
    }


async def test_a_plugin_replaced_under_running_servers_loses_nothing(
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    mps_control: FakeControl,
    nvml_file: Path,
    short_tmp: Path,
) -> None:
    hierarchy = short_tmp / "cgroup"
    hierarchy.mkdir()
    (hierarchy / "cgroup.controllers").write_text("cpu memory pids\n")
    kept = hierarchy / "gpushare-mps"
    mps_root = short_tmp / "mps"

    async with running(make_agent(isolation="mps", cgroup=kept), kubelet):
        await kubelet.admit("ns", "twenty", "c", 20)
        await kubelet.admit("ns", "twelve", "c", 12)
    # Both servers run and hold memory under their daemons' limits.
    write_fake(
        nvml_file,
        [card(CARD_A, 0), card(CARD_B, 1)],
        processes=[
            {"pid": 4001, "card": CARD_A, "used": "19Gi"},
            {"pid": 4002, "card": CARD_A, "used": "11Gi"},
        ],
    )
    before = limits(mps_root)
    assert sorted(limit for _, limit in before.values()) == ["0 12288M", "0 20480M"]
    commands = len(mps_control.lines())

    tear_down_pod(mps_control, kept)
    kubelet.devices = {}
    async with running(make_agent(isolation="mps", cgroup=kept), kubelet) as agent:
        await kubelet.wait_for(lambda: agent.holdings is not None)
        await agent.poll()
        # The same daemons, with the same limits: nothing was started, quit or set again.
        assert limits(mps_root) == before
        assert all(mps.alive(mps_root / pipe) for pipe in before)
        assert len(mps_control.lines()) == commands
        # The new plugin counts the running grants, their servers and the clients' memory.
        assert agent.granted_on(CARD_A) == 32 * GI  # type: ignore[arg-type]
        assert agent.mode.servers_on(CARD_A) == 2  # type: ignore[arg-type]
        assert agent.cards[CARD_A].used_bytes == 30 * GI  # type: ignore[index]
        # And so the card takes no more than is left beside them (47 units and a third server
        # would pass its 79.18 GiB by 15 MiB).
        held = kubelet.held()
        rest = [f"{CARD_A}-{u}" for u in range(79) if f"{CARD_A}-{u}" not in held]
        assert kubelet.stub is not None
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.stub.Allocate(allocate_request(*rest))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        answer = await kubelet.admit("ns", "fits", "c", 46)
        assert answer.envs[names.ENV_VISIBLE_DEVICES] == CARD_A
