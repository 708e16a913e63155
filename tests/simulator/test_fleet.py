"""``--nodes`` names a fleet from the GPU catalogue; a bad spec is refused with what to write."""

import pytest

from gpushare.core import errors
from gpushare.core.quantities import MI
from gpushare.simulator import fleet


@pytest.mark.parametrize(
    ("spec", "nodes", "cards", "models"),
    [
        ("4x8xH100-80GB", 4, 32, {"H100-80GB"}),
        ("4x8xH100-80GB,2x4xL4-24GB", 6, 40, {"H100-80GB", "L4-24GB"}),
        (" 1 x 2 x a100-40gb ", 1, 2, {"A100-40GB"}),
        ("1X1Xh200-141gb,", 1, 1, {"H200-141GB"}),
    ],
    ids=["default", "mixed", "spaces-and-case", "trailing-comma"],
)
def test_specs_parse_into_nodes_and_cards(
    spec: str, nodes: int, cards: int, models: set[str]
) -> None:
    parsed = fleet.parse(spec)
    assert len(parsed.nodes) == nodes
    assert len(parsed.cards) == cards
    assert {card.model.name for card in parsed.cards} == models


def test_nodes_are_named_by_model_and_cards_carry_stable_uuids() -> None:
    parsed = fleet.parse("2x2xH100-80GB,1x1xL4-24GB")
    assert [node.name for node in parsed.nodes] == ["h100-80gb-0", "h100-80gb-1", "l4-24gb-0"]
    uuids = [card.uuid for card in parsed.cards]
    assert len(set(uuids)) == len(uuids)
    assert uuids == [card.uuid for card in fleet.parse("2x2xH100-80GB,1x1xL4-24GB").cards]
    assert all(uuid.startswith("GPU-") for uuid in uuids)


def test_the_h100_matches_its_measured_memory() -> None:
    h100 = fleet.lookup("H100-80GB")
    assert h100.total_bytes == 81_559 * MI
    assert round(h100.cuda_total_bytes / 2**30, 2) == 79.18


def test_every_model_leaves_cuda_most_of_its_memory() -> None:
    for model in fleet.CATALOGUE.values():
        assert 0 < model.reserved_bytes < model.total_bytes * 0.02, model.name


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("4x8xH100", "unknown GPU model 'H100'; known models: H100-80GB"),
        ("4x8", "is not <nodes>x<cards>x<model>"),
        ("", "names no nodes"),
        ("0x8xH100-80GB", "at least one node"),
        ("1x17xH100-80GB", "1 to 16 cards"),
        ("65x1xL4-24GB", "at most 64"),
    ],
    ids=["unknown-model", "no-model", "empty", "no-nodes", "too-many-cards", "too-many-nodes"],
)
def test_bad_specs_are_refused_with_a_message(spec: str, says: str) -> None:
    with pytest.raises(errors.ConfigError, match=None) as refused:
        fleet.parse(spec)
    assert says in str(refused.value)
