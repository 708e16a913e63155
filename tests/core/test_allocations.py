"""The allocation annotations: one codec for the extender, the device plugin and their tests."""

from datetime import UTC, datetime

import pytest

from gpushare.core import allocations, errors, names
from gpushare.core.allocations import Allocation
from gpushare.core.ids import CardUUID

GI = 1 << 30
FIRST = Allocation("vllm", CardUUID("GPU-a"), 0, 79 * GI, 20 * GI)
SECOND = Allocation("sidecar", CardUUID("GPU-b"), 1, 79 * GI, 4 * GI)


@pytest.mark.parametrize(
    "pod", [(FIRST,), (FIRST, SECOND)], ids=["one container", "two containers"]
)
def test_what_is_encoded_decodes_to_the_same(pod: tuple[Allocation, ...]) -> None:
    notes = allocations.encode(pod, bind_time=datetime(2030, 1, 1, tzinfo=UTC))
    assert allocations.decode(notes, [a.container for a in pod]) == pod
    assert notes[names.ANNOTATION_BIND_TIME] == "2030-01-01T00:00:00.000Z"
    # The pod-level keys always describe the first container.
    assert notes[names.ANNOTATION_CARD_UUID] == "GPU-a"
    assert notes[names.ANNOTATION_GRANTED_BYTES] == str(20 * GI)
    assert (names.ANNOTATION_ALLOCATIONS in notes) == (len(pod) > 1)


def test_a_correction_leaves_the_bind_time_alone() -> None:
    assert names.ANNOTATION_BIND_TIME not in allocations.encode((FIRST,))


def test_a_pod_without_memory_containers_or_annotations_has_none() -> None:
    assert allocations.decode({names.ANNOTATION_CARD_UUID: "GPU-a"}, []) is None
    assert allocations.decode({}, ["vllm"]) is None


@pytest.mark.parametrize(
    ("notes", "says"),
    [
        ({names.ANNOTATION_ALLOCATIONS: "["}, "not JSON"),
        ({names.ANNOTATION_ALLOCATIONS: "[]"}, "non-empty JSON list"),
        ({names.ANNOTATION_ALLOCATIONS: '[{"card-uuid": "GPU-a"}]'}, "no container name"),
        ({names.ANNOTATION_CARD_UUID: "GPU-a", names.ANNOTATION_CARD_INDEX: "x"}, "card-index"),
    ],
    ids=["not json", "empty list", "no container", "bad number"],
)
def test_unreadable_annotations_are_refused_by_name(notes: dict[str, str], says: str) -> None:
    with pytest.raises(errors.BadRequest, match=says):
        allocations.decode(notes, ["vllm"])
