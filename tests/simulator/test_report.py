"""The end of a run: figures, JSON, the table and the picture, from a known outcome."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from gpushare.core import errors
from gpushare.core.ids import CardUUID
from gpushare.core.quantities import GI, MI
from gpushare.simulator import optimum, picture, report
from gpushare.simulator.outcome import CardState, Failure, Outcome, Placement, stranded

CAPACITY = 79 * GI


def _card(index: int, granted_gib: int, services: tuple[str, ...]) -> CardState:
    return CardState(
        node="h100-80gb-0", index=index, uuid=CardUUID(f"GPU-{index}"), model="H100-80GB",
        total_bytes=80 * GI, reserved_bytes=GI, capacity_bytes=CAPACITY,
        granted_bytes=granted_gib * GI, used_bytes=max(0, granted_gib - 1) * GI,
        overhead_bytes=0, services=services, cost=79.0,
    )


def _placement(name: str, index: int, gib: int) -> Placement:
    return Placement(
        service=f"default/{name}", label=name, pod=f"{name}-predictor", node="h100-80gb-0",
        card_uuid=f"GPU-{index}", card_index=index, requested_bytes=gib * GI,
        granted_bytes=gib * GI, utilization="0.2", used_bytes=(gib - 1) * GI,
    )


@pytest.fixture
def outcome() -> Outcome:
    result = Outcome(
        fleet="1x3xH100-80GB", fleet_description="1 node x 3 H100-80GB", policy="binpack",
        isolation="mps", seed=0, services=5, reserve_bytes=716 * MI,
    )
    result.placements = [_placement("a", 0, 60), _placement("b", 0, 15), _placement("c", 1, 70)]
    result.failures = [
        Failure("default/d", "d", 20 * GI, "scheduling", "0/1 nodes are available: 1 no card"),
        Failure("default/e", "e", None, "admission", "did you mean gpushare.io/gpu-memory?"),
    ]
    result.cards = [_card(0, 75, ("default/a", "default/b")), _card(1, 70, ("default/c",)),
                    _card(2, 0, ())]
    result.optimum = optimum.Packing("optimal", 2, 2, 4, {}, 0.1, cost=158.0, cost_bound=158.0)
    return result


def test_the_figures_count_cards_baseline_and_stranded_memory(outcome: Outcome) -> None:
    assert outcome.cards_used == 2
    assert outcome.baseline == 4  # three running and one waiting; the denied one needs no card
    assert outcome.smallest_waiting_bytes == 20 * GI
    # Card 0 has 4 GiB and card 1 has 9 GiB left, both under the waiting 20 GiB; card 2 is empty.
    assert outcome.stranded_bytes == 13 * GI
    assert outcome.cost_used == 158.0


def test_no_ratio_compares_unequal_workloads(outcome: Outcome) -> None:
    # The optimum also places the waiting d: four services against three here.
    assert outcome.ratio is None and outcome.card_ratio is None
    assert outcome.comparison == "not comparable: 3 services run here, the optimum places 4"
    console = Console(width=160, record=True)
    report.print_report(outcome, console)
    assert "not comparable: 3 services run here, the optimum places 4" in console.export_text()


def test_the_ratio_counts_cost_so_fewer_cards_cannot_hide_dearer_ones(outcome: Outcome) -> None:
    # Same three services; the optimum uses three cheap cards (24 each) where this run used two
    # H100s (79 each): more cards, less cost.
    outcome.failures = outcome.failures[1:]
    outcome.optimum = optimum.Packing("optimal", 3, 3, 3, {}, 0.1, cost=72.0, cost_bound=72.0)
    assert outcome.card_ratio == pytest.approx(2 / 3)
    assert outcome.ratio == pytest.approx(158 / 72)
    data = outcome.to_json()["summary"]
    assert data["ratio_to_optimum"] == round(158 / 72, 4)
    assert data["comparison"] == "same services placed"


def test_stranded_memory_never_counts_a_card_that_could_take_the_request() -> None:
    cards = [_card(0, 40, ("x",)), _card(1, 70, ("y",))]
    assert stranded(cards, 20 * GI) == 9 * GI
    assert stranded(cards, None) == 0


def test_the_json_is_plain_and_complete(outcome: Outcome) -> None:
    data = json.loads(json.dumps(outcome.to_json()))
    assert data["summary"]["cards_used"] == 2
    assert data["summary"]["baseline_cards"] == 4
    assert data["summary"]["optimum"]["status"] == "optimal"
    assert data["summary"]["ratio_to_optimum"] is None
    assert data["summary"]["cost_used"] == 158.0
    assert [f["stage"] for f in data["failures"]] == ["scheduling", "admission"]
    assert len(data["cards"]) == 3 and len(data["placements"]) == 3


def test_the_table_names_cards_services_figures_and_reasons(outcome: Outcome) -> None:
    console = Console(width=160, record=True)
    report.print_report(outcome, console)
    text = console.export_text()
    for expected in ("h100-80gb-0 #0", "a, b", "1 idle card", "GPUs used, sharing",
                     "GPUs used, one model per GPU", "CP-SAT optimal", "online / optimum",
                     "stranded memory", "13 GiB", "0/1 nodes are available: 1 no card",
                     "did you mean"):
        assert expected in text, expected


def test_the_picture_is_a_png(outcome: Outcome, tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    picture.draw(outcome, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unwritable_picture_is_a_bad_request(outcome: Outcome, tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest, match="cannot write the picture"):
        picture.draw(outcome, tmp_path / "missing" / "report.png")
