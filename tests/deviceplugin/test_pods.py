"""Which container kubelet is admitting: kubelet's admission order over bound, matching pods."""

from datetime import UTC, datetime

from gpushare.core import allocations, names
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID, pod_key
from gpushare.deviceplugin.pods import PodInfo, next_wanted
from tests.deviceplugin.conftest import CARD_A, CARD_B, GI

CARDS = {CardUUID(CARD_A), CardUUID(CARD_B)}


def pod(
    name: str,
    *,
    card: str = CARD_A,
    units: int = 4,
    bind: str | None = None,
    created: str = "2030-01-01T00:00:00Z",
    phase: str = "Pending",
    deleting: bool = False,
) -> PodInfo:
    annotations = {
        names.ANNOTATION_CARD_UUID: card,
        names.ANNOTATION_CARD_INDEX: "0",
        names.ANNOTATION_CARD_TOTAL: str(79 * GI),
        names.ANNOTATION_GRANTED_BYTES: str(units * GI),
    }
    if bind:
        annotations[names.ANNOTATION_BIND_TIME] = bind
    return PodInfo(
        namespace="ns",
        name=name,
        annotations=annotations,
        requests={"c": units},
        phase=phase,
        created=datetime.fromisoformat(created),
        deleting=deleting,
    )


def choose(
    pods: list[PodInfo], units: int = 4, held: frozenset[tuple[str, str]] = frozenset()
) -> str | None:
    wanted = next_wanted(
        pods,
        units=units,
        unit_bytes=GI,
        cards=CARDS,
        held={(pod_key("ns", p), c) for p, c in held},
    )
    return f"{wanted.pod.name}/{wanted.container}" if wanted else None


def test_kubelets_creation_order_wins_over_bind_order() -> None:
    pods = [
        pod("bound-first", bind="2030-01-01T00:00:01Z", created="2030-01-01T00:00:05Z"),
        pod("created-first", bind="2030-01-01T00:00:09Z", created="2030-01-01T00:00:02Z"),
    ]
    assert choose(pods) == "created-first/c"


def test_within_one_second_of_creation_bind_order_decides() -> None:
    pods = [pod("b", bind="2030-01-01T00:00:02Z"), pod("a", bind="2030-01-01T00:00:01+00:00")]
    assert choose(pods) == "a/c"


def test_containers_that_hold_devices_are_skipped() -> None:
    pods = [pod("a", bind="2030-01-01T00:00:01Z"), pod("b", bind="2030-01-01T00:00:02Z")]
    assert choose(pods, held=frozenset({("a", "c")})) == "b/c"


def test_a_pods_next_container_gets_its_own_card() -> None:
    two = PodInfo(
        namespace="ns",
        name="two",
        annotations=allocations.encode(
            [
                Allocation("first", CardUUID(CARD_A), 0, 79 * GI, 4 * GI),
                Allocation("second", CardUUID(CARD_B), 1, 79 * GI, 4 * GI),
            ]
        ),
        requests={"first": 4, "second": 4},
    )
    first = next_wanted([two], units=4, unit_bytes=GI, cards=CARDS, held=())
    assert first is not None and (first.container, first.card) == ("first", CARD_A)
    second = next_wanted(
        [two], units=4, unit_bytes=GI, cards=CARDS, held={(pod_key("ns", "two"), "first")}
    )
    assert second is not None and (second.container, second.card) == ("second", CARD_B)


def test_the_request_size_must_match() -> None:
    assert choose([pod("a", units=8)], units=4) is None
    assert choose([pod("a", units=8)], units=8) == "a/c"


def test_pods_of_other_nodes_cards_not_pending_or_terminating_are_skipped() -> None:
    assert choose([pod("elsewhere", card="GPU-other")]) is None
    assert choose([pod("running", phase="Running")]) is None
    assert choose(
        [pod("going", deleting=True), pod("staying", created="2031-01-01T00:00:00Z")]
    ) == ("staying/c")


def test_only_readable_allocation_annotations_count() -> None:
    bare = PodInfo(
        namespace="ns",
        name="x",
        annotations={names.ANNOTATION_CARD_UUID: CARD_B},
        requests={"c": 4},
    )
    assert choose([bare]) is None  # the card's other keys are missing: unreadable
    complete = PodInfo(
        namespace="ns",
        name="x",
        annotations={
            names.ANNOTATION_CARD_UUID: CARD_B,
            names.ANNOTATION_CARD_INDEX: "1",
            names.ANNOTATION_CARD_TOTAL: str(79 * GI),
            names.ANNOTATION_GRANTED_BYTES: "0",
        },
        requests={"c": 4},
    )
    assert choose([complete]) == "x/c"


def test_reads_the_api_form() -> None:
    info = PodInfo.from_api(
        {
            "metadata": {
                "namespace": "ns",
                "name": "p",
                "uid": "u-1",
                "creationTimestamp": "2030-01-01T00:00:00Z",
                "annotations": {names.ANNOTATION_CARD_UUID: CARD_A},
                "deletionTimestamp": "2030-01-01T00:01:00Z",
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
    assert info.deleting
    assert info.bind_time == datetime(2030, 1, 1, tzinfo=UTC)
