"""The fake NVML backend: a file of cards, processes and faults, read again when it changes."""

from pathlib import Path

import pytest

from gpushare.core import errors
from gpushare.deviceplugin import nvml
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    H100_CUDA_TOTAL,
    H100_RESERVED,
    H100_TOTAL,
    card,
    write_fake,
)


def test_reads_cards_and_counts_processes_as_used(nvml_file: Path) -> None:
    write_fake(
        nvml_file,
        [card(CARD_A, 0, used="66Mi", utilization=0.5), card(CARD_B, 1)],
        processes=[
            {"pid": 10, "card": CARD_A, "used": "20Gi"},
            {"pid": 11, "card": CARD_A, "used": "1Gi"},
        ],
    )
    snap = nvml.FakeNvml(path=nvml_file).snapshot()
    a, b = snap.cards
    assert (a.uuid, a.index, a.total_bytes, a.reserved_bytes) == (
        CARD_A,
        0,
        H100_TOTAL,
        H100_RESERVED,
    )
    assert a.used_bytes == 21 * GI + 66 * 2**20
    assert a.free_bytes == H100_CUDA_TOTAL - a.used_bytes
    assert a.cuda_total_bytes == H100_CUDA_TOTAL and a.utilization == 0.5
    assert b.used_bytes == 0
    assert [(p.pid, p.card, p.used_bytes) for p in snap.processes] == [
        (10, CARD_A, 20 * GI),
        (11, CARD_A, GI),
    ]


def test_a_changed_file_is_read_again(nvml_file: Path) -> None:
    fake = nvml.FakeNvml(path=nvml_file)
    assert fake.snapshot().cards[1].error is None
    write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1, error="GPU is lost")])
    broken = fake.snapshot().cards[1]
    assert broken.error == "GPU is lost"


def test_a_half_written_file_keeps_the_previous_state(nvml_file: Path) -> None:
    fake = nvml.FakeNvml(path=nvml_file)
    nvml_file.write_text("cards: [")
    assert len(fake.snapshot().cards) == 2


def test_no_driver_is_a_snapshot_error_not_an_exception(nvml_file: Path) -> None:
    write_fake(nvml_file, [card(CARD_A, 0)], error="Driver Not Loaded")
    snap = nvml.FakeNvml(path=nvml_file).snapshot()
    assert snap.cards == () and snap.error == "NVML cannot start: Driver Not Loaded"


def test_xid_events_are_delivered_once(nvml_file: Path) -> None:
    fake = nvml.FakeNvml(path=nvml_file)
    assert fake.wait_events(0.01) == []
    write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1)], xid=[{"card": CARD_B, "xid": 79}])
    assert fake.wait_events(1.0) == [nvml.XidEvent(card=CARD_B, xid=79)]  # type: ignore[arg-type]
    assert fake.wait_events(0.01) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cards: [{uuid: GPU-1, index: 0}]", "cards.0.total: Field required"),
        ("cards: [{uuid: GPU-1, index: 0, total: 1Gi, colour: red}]", "colour: unknown key"),
        (
            "cards: []\nprocesses: [{pid: 1, card: GPU-9, used: 1Gi}]",
            "'GPU-9' is not one of the cards",
        ),
        ("cards: [{uuid: GPU-1, index: 0, total: lots}]", "not a Kubernetes quantity"),
    ],
    ids=["missing-total", "unknown-key", "unknown-card", "bad-quantity"],
)
def test_a_bad_file_names_its_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError, match=message):
        nvml.FakeNvml(path=path)


@pytest.mark.parametrize("spec", ["fake", "fake:", "gpu", "real:x"])
def test_the_backend_flag_is_checked(spec: str) -> None:
    with pytest.raises(errors.ConfigError, match="write 'real' or 'fake:FILE'"):
        nvml.open_backend(spec)
