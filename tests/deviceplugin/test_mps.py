"""MPS modes against a recording stand-in for nvidia-cuda-mps-control."""

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gpushare.core.config import Isolation
from gpushare.deviceplugin import allocation, mps
from tests.deviceplugin.conftest import CARD_A, CARD_B, GI, FakeControl


async def kill(pipe: Path) -> None:
    """Kill a daemon the fake started, and wait until it is gone."""
    os.kill(int((pipe / mps.PID_FILE).read_text()), signal.SIGKILL)
    for _ in range(200):
        if not mps.alive(pipe):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"daemon of {pipe} still alive")


def grant(card: str, *units: int) -> allocation.Grant:
    return allocation.grant_of([f"{card}-{u}" for u in units], unit_bytes=GI)


async def test_a_daemon_per_container_gets_its_grant_before_any_client(
    short_tmp: Path, mps_control: FakeControl
) -> None:
    mode = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await mode.start()
    g10, g20 = grant(CARD_A, *range(10)), grant(CARD_A, *range(10, 30))
    pipe10, pipe20 = await mode.prepare(g10), await mode.prepare(g20)
    assert pipe10 != pipe20 and pipe10 is not None and pipe20 is not None
    assert mps_control.lines() == [
        f"{pipe10} start CUDA_VISIBLE_DEVICES={CARD_A}",
        f"{pipe10} set_default_device_pinned_mem_limit 0 10240M",
        f"{pipe20} start CUDA_VISIBLE_DEVICES={CARD_A}",
        f"{pipe20} set_default_device_pinned_mem_limit 0 20480M",
    ]
    assert mode.servers_on(CARD_A) == 2 and mode.servers_on(CARD_B) == 0  # type: ignore[arg-type]
    assert await mode.prepare(g10) == pipe10  # already running: nothing new
    assert len(mps_control.lines()) == 4


async def test_a_restarted_agent_adopts_running_daemons(
    short_tmp: Path, mps_control: FakeControl
) -> None:
    first = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await first.start()
    pipe = await first.prepare(grant(CARD_B, 0, 1))
    second = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await second.start()
    assert second.servers_on(CARD_B) == 1  # type: ignore[arg-type]
    assert await second.prepare(grant(CARD_B, 0, 1)) == pipe


async def test_ids_handed_to_a_new_container_stop_the_old_daemon(
    short_tmp: Path, mps_control: FakeControl
) -> None:
    mode = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await mode.start()
    old = await mode.prepare(grant(CARD_A, 0, 1, 2))
    await mode.prepare(grant(CARD_A, 2, 3))
    assert f"{old} quit" in mps_control.lines()
    assert mode.servers_on(CARD_A) == 1  # type: ignore[arg-type]


async def test_a_dead_daemon_is_restarted_with_its_grant(
    short_tmp: Path, mps_control: FakeControl
) -> None:
    mode = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await mode.start()
    pipe = await mode.prepare(grant(CARD_A, 0, 1))
    assert pipe is not None
    await kill(pipe)
    await mode.check()
    assert mps_control.lines().count(f"{pipe} set_default_device_pinned_mem_limit 0 2048M") == 2
    assert mps.alive(pipe)


async def test_the_shared_daemon_is_supervised(short_tmp: Path, mps_control: FakeControl) -> None:
    mode = mps.make("mps-shared", short_tmp / "mps", control=str(mps_control.path))
    assert mode.down_reason() is not None  # not started yet: grant nothing
    await mode.start()
    assert mode.down_reason() is None
    pipe = await mode.prepare(grant(CARD_A, 0))
    assert pipe == short_tmp / "mps" / "shared"
    assert mode.servers_on(CARD_A) == mode.servers_on(CARD_B) == 1  # type: ignore[arg-type]
    await kill(pipe)
    assert mode.down_reason() == "shared MPS daemon is down"
    with pytest.raises(mps.MpsError):
        await mode.prepare(grant(CARD_A, 0))
    await mode.check()
    assert mode.down_reason() is None
    assert mps_control.lines().count(f"{pipe} start CUDA_VISIBLE_DEVICES=") == 2


async def test_a_missing_control_program_is_a_reason_to_grant_nothing(short_tmp: Path) -> None:
    names: tuple[Isolation, ...] = ("mps", "mps-shared")
    for name in names:
        mode = mps.make(name, short_tmp / "mps", control=str(short_tmp / "absent"))
        await mode.start()
        assert "not found" in (mode.down_reason() or "")
    assert mps.make("none", short_tmp).down_reason() is None


def read_at(folder: int, name: str) -> str:
    """Read ``name`` in the folder open as ``folder``, as a process whose mount holds it would."""
    fd = os.open(name, os.O_RDONLY, dir_fd=folder)
    with os.fdopen(fd) as file:
        return file.read().strip()


@pytest.mark.parametrize("how", ["supervised", "adopted"])
async def test_a_new_process_in_a_running_container_finds_the_restarted_daemon(
    short_tmp: Path, mps_control: FakeControl, how: str
) -> None:
    mode = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
    await mode.start()
    pipe = await mode.prepare(grant(CARD_A, 0, 1))
    assert pipe is not None
    # The container's bind mount holds the folder's inode; an open descriptor holds it the same way.
    mounted = os.open(pipe, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = int(read_at(mounted, mps.PID_FILE))
        await kill(pipe)
        if how == "adopted":  # the daemon died while the agent was away
            mode = mps.make("mps", short_tmp / "mps", control=str(mps_control.path))
            await mode.start()
        await mode.check()
        # Through its mount, a new process finds a live daemon with the grant as its limit.
        second = int(read_at(mounted, mps.PID_FILE))
        assert second != first and mps.running(second)
        assert read_at(mounted, "default-limit") == "0 2048M"
        assert os.stat(pipe).st_ino == os.fstat(mounted).st_ino
    finally:
        os.close(mounted)


async def test_daemons_are_moved_into_the_named_cgroup(
    short_tmp: Path, mps_control: FakeControl, caplog: pytest.LogCaptureFixture
) -> None:
    hierarchy = short_tmp / "cgroup"
    hierarchy.mkdir()
    (hierarchy / "cgroup.controllers").write_text("cpu memory pids\n")
    keep = hierarchy / "gpushare-mps"
    modes: tuple[Isolation, ...] = ("mps", "mps-shared")
    for name in modes:
        mode = mps.make(name, short_tmp / name, control=str(mps_control.path), cgroup=keep)
        await mode.start()
        pipe = await mode.prepare(grant(CARD_A, 0))
        assert pipe is not None
        pid = (pipe / mps.PID_FILE).read_text().strip()
        assert pid in (keep / "cgroup.procs").read_text()
    # Not a cgroup v2 hierarchy: the daemon runs, and the log says it ends with the agent's pod.
    plain = mps.make(
        "mps", short_tmp / "plain", control=str(mps_control.path), cgroup=short_tmp / "x"
    )
    await plain.start()
    assert mps.alive(await plain.prepare(grant(CARD_B, 0)))  # type: ignore[arg-type]
    assert "ends with its pod" in caplog.text
