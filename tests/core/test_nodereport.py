"""The node report: one versioned model the agent writes and the extender reads, byte for byte."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given

from gpushare.core import errors, nodereport
from gpushare.core.ids import CardUUID
from tests import strategies

H100 = nodereport.CardReport(
    uuid=CardUUID("GPU-5d3c1a2b-0000-4000-8000-000000000001"),
    index=0,
    model="NVIDIA H100 80GB HBM3",
    total_bytes=85_520_809_984,
    reserved_bytes=553_648_128,
    used_bytes=0,
    free_bytes=84_967_161_856,
)
REPORT = nodereport.NodeReport(
    heartbeat=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), cards=(H100,), isolation="mps"
)

# The wire format is a contract between two programs of possibly different versions: pin it.
WIRE = (
    '{"version":2,"heartbeat":"2024-05-01T12:00:00Z","cards":[{"uuid":'
    '"GPU-5d3c1a2b-0000-4000-8000-000000000001","index":0,"model":"NVIDIA H100 80GB HBM3",'
    '"total_bytes":85520809984,"reserved_bytes":553648128,"used_bytes":0,'
    '"free_bytes":84967161856,"healthy":true,"memory_limits":false}],"isolation":"mps"}'
)
WIRE_V1 = (
    '{"version":1,"heartbeat":"2024-05-01T12:00:00Z","cards":[{"uuid":'
    '"GPU-5d3c1a2b-0000-4000-8000-000000000001","index":0,"model":"NVIDIA H100 80GB HBM3",'
    '"total_bytes":85520809984,"reserved_bytes":553648128,"used_bytes":0,'
    '"free_bytes":84967161856,"healthy":true}]}'
)
"""What agents before version 2 wrote: no isolation, no per-cgroup limit support."""


def test_the_wire_format_is_pinned() -> None:
    assert REPORT.encode() == WIRE
    assert nodereport.decode(WIRE) == REPORT


def test_a_version_1_report_still_reads() -> None:
    decoded = nodereport.decode(WIRE_V1)
    assert decoded.version == 1
    assert decoded.isolation is None
    assert decoded.cards == (H100,) and not decoded.cards[0].memory_limits


def test_the_isolation_is_part_of_the_state() -> None:
    assert not REPORT.same_state(REPORT.model_copy(update={"isolation": "cgroup"}))


@given(strategies.node_reports())
def test_encode_decode_round_trips_byte_for_byte(report: nodereport.NodeReport) -> None:
    text = report.encode()
    decoded = nodereport.decode(text)
    assert decoded == report
    assert decoded.encode() == text


def test_the_cuda_total_excludes_the_drivers_reserve() -> None:
    assert H100.cuda_total_bytes == 85_520_809_984 - 553_648_128


def _with(**changes: object) -> str:
    raw = json.loads(WIRE)
    raw.update(changes)
    return json.dumps(raw)


def _with_card(**changes: object) -> str:
    raw = json.loads(WIRE)
    raw["cards"][0].update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize(
    "text",
    [_with(version=3), _with(version=99, cards="a new shape", gpus=[])],
    ids=["version-3", "version-99-with-new-fields"],
)
def test_a_newer_report_is_rejected_not_misread(text: str) -> None:
    with pytest.raises(
        errors.ReportVersionError, match=r"newer than this reader understands \(2\)"
    ):
        nodereport.decode(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('"report"', "not a JSON object"),
        ("{}", "no valid version"),
        (_with(version="1"), "no valid version"),
        (_with(version=0), "no valid version"),
        (_with(version=None), "no valid version"),
        (_with(heartbeat="yesterday"), "heartbeat"),
        (_with(heartbeat="2024-05-01T12:00:00"), "heartbeat"),
        (_with(cards=None), "cards"),
        (_with(extra=1), "extra"),
        (_with_card(total_bytes=-1), "cards.0.total_bytes"),
        (_with_card(free_bytes="lots"), "cards.0.free_bytes"),
        (_with_card(fan="on"), "cards.0.fan"),
        (_with_card(uuid=None), "cards.0.uuid"),
    ],
    ids=[
        "empty",
        "truncated",
        "array",
        "string",
        "no-version",
        "version-as-string",
        "version-zero",
        "version-null",
        "heartbeat-not-a-time",
        "heartbeat-without-timezone",
        "cards-null",
        "unknown-top-level-field",
        "negative-total",
        "free-not-a-number",
        "unknown-card-field",
        "uuid-null",
    ],
)
def test_malformed_reports_are_bad_requests(text: str, fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        nodereport.decode(text)
    assert not isinstance(info.value, errors.ReportVersionError)
    assert fragment in str(info.value)


def test_a_decoded_report_knows_its_age() -> None:
    report = nodereport.decode(WIRE)
    assert report.age_seconds(REPORT.heartbeat + timedelta(seconds=90)) == 90.0
    assert report.age_seconds() > 0


def test_same_state_ignores_the_heartbeat() -> None:
    later = REPORT.model_copy(update={"heartbeat": REPORT.heartbeat + timedelta(minutes=1)})
    busier = REPORT.model_copy(
        update={"cards": (H100.model_copy(update={"used_bytes": 1, "free_bytes": 0}),)}
    )
    assert REPORT.same_state(later)
    assert not REPORT.same_state(busier)
    assert not REPORT.same_state(None)
