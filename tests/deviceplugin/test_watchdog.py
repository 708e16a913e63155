"""The watchdog: processes traced to containers through their cgroup, use summed per container,
over-use acted on once past the grace period."""

from pathlib import Path

import pytest

from gpushare.core import names
from gpushare.core.ids import CardUUID, pod_key
from gpushare.deviceplugin import watchdog
from gpushare.deviceplugin.nvml import ProcessUsage
from gpushare.deviceplugin.pods import PodInfo
from tests.deviceplugin.conftest import CARD_A, GI

UID = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
CID = "a" * 64
CID2 = "b" * 64


@pytest.mark.parametrize(
    "text",
    [
        f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu:/kubepods/burstable/pod{UID}/{CID}\n",
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n",
        f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope\n",
        f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
    ],
    ids=["cgroup-v1", "v2-systemd-containerd", "v2-crio-guaranteed", "v2-cgroupfs"],
)
def test_a_cgroup_names_pod_and_container(text: str) -> None:
    location = watchdog.parse_cgroup(text)
    assert location is not None
    assert (location.pod_uid, location.container_id) == (UID, CID)
    assert location.cgroup.endswith(CID) or location.cgroup.endswith(f"{CID}.scope")


@pytest.mark.parametrize(
    "text",
    ["0::/user.slice/user-0.slice/session-1.scope\n", "", "0::/system.slice/containerd.service\n"],
)
def test_processes_outside_pods_have_no_location(text: str) -> None:
    assert watchdog.parse_cgroup(text) is None


def write_proc(root: Path, pid: int, uid: str, cid: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n"
    )


def vllm_pod() -> PodInfo:
    return PodInfo(
        namespace="ns",
        name="bloom",
        uid=UID,
        phase="Running",
        annotations={names.ANNOTATION_CARD_UUID: CARD_A},
        container_ids={CID: "kserve-container", CID2: "sidecar"},
    )


def test_use_is_summed_per_container(tmp_path: Path) -> None:
    for pid, cid in ((100, CID), (101, CID), (102, CID2)):
        write_proc(tmp_path, pid, UID, cid)
    processes = [
        ProcessUsage(100, CardUUID(CARD_A), 8 * GI),
        ProcessUsage(101, CardUUID(CARD_A), 3 * GI),
        ProcessUsage(102, CardUUID(CARD_A), GI),
        ProcessUsage(999, CardUUID(CARD_A), 5 * GI),  # not in any pod (or gone)
    ]
    grants = {(pod_key("ns", "bloom"), "kserve-container"): (CardUUID(CARD_A), 10 * GI)}
    usages = watchdog.usage(
        processes, locator=watchdog.CgroupLocator(tmp_path), pods=[vllm_pod()], grants=grants
    )
    by_container = {u.container: (u.used_bytes, u.granted_bytes, u.over) for u in usages}
    assert by_container == {"kserve-container": (11 * GI, 10 * GI, True), "sidecar": (GI, 0, True)}


async def test_over_use_is_acted_on_once_after_the_grace() -> None:
    now = [0.0]
    seen: list[str] = []
    dog = watchdog.Watchdog(
        None,
        node="n",
        grace_seconds=30,
        action="event",
        on_violation=lambda u: seen.append(u.key),
        clock=lambda: now[0],
    )
    over = watchdog.ContainerUsage(
        vllm_pod(), "kserve-container", CardUUID(CARD_A), 11 * GI, 10 * GI
    )
    under = watchdog.ContainerUsage(
        vllm_pod(), "kserve-container", CardUUID(CARD_A), 9 * GI, 10 * GI
    )
    assert await dog.check([over]) == []
    now[0] = 29
    assert await dog.check([over]) == []
    now[0] = 31
    assert await dog.check([over]) == [over]
    now[0] = 100
    assert await dog.check([over]) == []  # one report per episode
    assert await dog.check([under]) == []  # episode over
    now[0] = 200
    await dog.check([over])
    now[0] = 231
    assert await dog.check([over]) == [over]
    assert seen == ["ns/bloom/kserve-container"] * 2


def test_a_poll_locator_reads_each_process_once() -> None:
    reads: list[int] = []

    class Counting:
        def locate(self, pid: int) -> watchdog.Location | None:
            reads.append(pid)
            return None if pid == 2 else watchdog.Location("uid", "cid", "/kubepods")

    locator = watchdog.PollLocator(Counting())
    for _ in range(3):
        assert locator.locate(1) == watchdog.Location("uid", "cid", "/kubepods")
        assert locator.locate(2) is None
    assert reads == [1, 2]
