"""Which pod kubelet is admitting: the oldest bound, matching, device-less pod."""

from datetime import UTC, datetime

from gpushare import names
from gpushare.deviceplugin.pods import PodInfo, choose_pod
from gpushare.ids import CardUUID, pod_key
from tests.deviceplugin.conftest import CARD_A, CARD_B, GI

CARDS = {CardUUID(CARD_A), CardUUID(CARD_B)}


def pod(
    name: str,
    *,
    card: str = CARD_A,
    units: int = 4,
    bind: str | None = None,
    phase: str = "Pending",
) -> PodInfo:
    annotations = {
        names.ANNOTATION_CARD_UUID: card,
        names.ANNOTATION_GRANTED_BYTES: str(units * GI),
    }
    if bind:
        annotations[names.ANNOTATION_BIND_TIME] = bind
    return PodInfo(namespace="ns", name=name, annotations=annotations, phase=phase)


def choose(pods: list[PodInfo], units: int = 4, holders: set[str] = frozenset()) -> str | None:  # type: ignore[assignment]
    picked = choose_pod(
        pods, units=units, unit_bytes=GI, cards=CARDS, holders={pod_key("ns", h) for h in holders}
    )
    return picked.name if picked else None


def test_the_oldest_bind_wins() -> None:
    pods = [pod("b", bind="2030-01-01T00:00:02Z"), pod("a", bind="2030-01-01T00:00:01+00:00")]
    assert choose(pods) == "a"


def test_pods_that_hold_devices_are_skipped() -> None:
    pods = [pod("a", bind="2030-01-01T00:00:01Z"), pod("b", bind="2030-01-01T00:00:02Z")]
    assert choose(pods, holders={"a"}) == "b"


def test_the_request_size_must_match() -> None:
    assert choose([pod("a", units=8)], units=4) is None
    assert choose([pod("a", units=8)], units=8) == "a"


def test_pods_of_other_nodes_cards_or_not_pending_are_skipped() -> None:
    assert choose([pod("elsewhere", card="GPU-other")]) is None
    assert choose([pod("running", phase="Running")]) is None


def test_a_container_request_matches_without_a_grant_annotation() -> None:
    bare = PodInfo(
        namespace="ns",
        name="x",
        annotations={names.ANNOTATION_CARD_UUID: CARD_B},
        requests={"c": 4},
    )
    assert choose([bare]) == "x"


def test_reads_the_api_form() -> None:
    info = PodInfo.from_api(
        {
            "metadata": {
                "namespace": "ns",
                "name": "p",
                "uid": "u-1",
                "creationTimestamp": "2030-01-01T00:00:00Z",
                "annotations": {names.ANNOTATION_CARD_UUID: CARD_A},
            },
            "spec": {
                "nodeName": "n1",
                "containers": [
                    {"name": "vllm", "resources": {"limits": {names.RESOURCE_GPU_MEMORY: "20"}}},
                    {"name": "sidecar", "resources": {}},
                ],
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [{"name": "vllm", "containerID": "containerd://abc"}],
            },
        }
    )
    assert (
        info.key == "ns/p" and info.uid == "u-1" and info.node == "n1" and info.phase == "Running"
    )
    assert info.requests == {"vllm": 20}
    assert info.container_ids == {"abc": "vllm"}
    assert info.card == CARD_A
    assert info.bind_time == datetime(2030, 1, 1, tzinfo=UTC)
