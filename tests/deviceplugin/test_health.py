"""Health goes both ways: faults, XIDs and a down MPS daemon make a card unhealthy; recovery
clears them."""

from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import health, nvml
from tests.deviceplugin.conftest import CARD_A, CARD_B

A = CardUUID(CARD_A)
B = CardUUID(CARD_B)


def reading(uuid: CardUUID, index: int, error: str | None = None) -> nvml.CardReading:
    return nvml.CardReading(uuid, index, "H100", 80, 0, 0, 80, error=error)


def snap(*errors: str | None, error: str | None = None) -> nvml.Snapshot:
    return nvml.Snapshot(
        cards=tuple(reading(u, i, e) for i, (u, e) in enumerate(zip((A, B), errors, strict=False))),
        error=error,
    )


def test_a_read_error_and_its_recovery_are_both_transitions() -> None:
    tracker = health.HealthTracker()
    assert {t.card for t in tracker.observe(snap(None, None))} == {A, B}
    assert tracker.observe(snap(None, "GPU is lost")) == [
        health.Transition(B, False, "NVML cannot read the card: GPU is lost")
    ]
    assert not tracker.healthy(B) and tracker.healthy(A)
    assert tracker.observe(snap(None, None)) == [health.Transition(B, True, "healthy")]


def test_a_critical_xid_holds_the_card_then_lapses() -> None:
    now = [0.0]
    tracker = health.HealthTracker(xid_hold_seconds=300, clock=lambda: now[0])
    tracker.observe(snap(None, None))
    assert tracker.xid([nvml.XidEvent(A, 48)]) == [
        health.Transition(A, False, "critical XID 48; held for 300 s")
    ]
    now[0] = 299
    assert tracker.observe(snap(None, None)) == []
    now[0] = 301
    assert tracker.observe(snap(None, None)) == [health.Transition(A, True, "healthy")]


def test_application_xids_leave_the_card_healthy() -> None:
    tracker = health.HealthTracker()
    tracker.observe(snap(None, None))
    assert tracker.xid([nvml.XidEvent(A, 13), nvml.XidEvent(A, 31), nvml.XidEvent(A, 43)]) == []
    assert tracker.healthy(A)


def test_a_down_isolation_or_nvml_makes_every_card_unhealthy() -> None:
    tracker = health.HealthTracker()
    tracker.observe(snap(None, None))
    assert len(tracker.isolation("shared MPS daemon is down")) == 2
    assert tracker.reason(A) == "shared MPS daemon is down"
    assert len(tracker.isolation(None)) == 2
    assert len(tracker.observe(snap(error="NVML cannot start: Driver Not Loaded"))) == 2
    assert tracker.reason(B) == "NVML cannot start: Driver Not Loaded"
