"""Kubernetes quantities as memory sizes, and the cluster's memory unit."""

import math
from collections.abc import Callable
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import utils as kubernetes_utils

from gpushare.core import errors, quantities
from gpushare.core.quantities import GI, KI, MI
from tests import strategies

parse_quantity: Callable[[str], Decimal] = kubernetes_utils.parse_quantity
"""The Kubernetes client's parser: the oracle."""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20Gi", 20 * GI),
        ("20480Mi", 20 * GI),
        ("21474836480", 20 * GI),
        ("20G", 20 * 1000**3),
        ("1.5Gi", 1536 * MI),
        ("2e9", 2 * 1000**3),
        ("2E9", 2 * 1000**3),
        ("20E", 20 * 1000**6),
        ("1Ei", KI**6),
        ("512k", 512_000),
        ("0", 0),
        (".5Gi", 512 * MI),
        ("+1Ki", KI),
        (21474836480, 20 * GI),
    ],
    ids=lambda v: repr(v) if isinstance(v, str | int) else None,
)
def test_memory_quantities_parse_to_bytes(text: str | int, expected: int) -> None:
    assert quantities.parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.0000001Ki", KI + 1),
        ("0.1", 1),
        ("1e-3", 1),
        ("1.5", 2),
        # 29 significant digits: past Decimal's default precision of 28, the fraction must not
        # be rounded away before the ceiling.
        ("1.0000000000000000000000000001Gi", GI + 1),
        ("1.00000000000000000000000000001", 2),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_fractions_of_a_byte_round_up(text: str, expected: int) -> None:
    assert quantities.parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("500m", "sub-unit suffix 'm'"),
        ("3u", "sub-unit suffix 'u'"),
        ("7n", "sub-unit suffix 'n'"),
        ("-1Gi", "negative"),
        (-5, "negative"),
        ("", "not a Kubernetes quantity"),
        ("abc", "not a Kubernetes quantity"),
        ("20GB", "not a Kubernetes quantity"),
        ("20gi", "not a Kubernetes quantity"),
        ("20K", "not a Kubernetes quantity"),
        ("20 Gi", "not a Kubernetes quantity"),
        ("1,5Gi", "not a Kubernetes quantity"),
        ("0x10", "not a Kubernetes quantity"),
        ("1e", "not a Kubernetes quantity"),
        ("1e3Gi", "not a Kubernetes quantity"),
        ("Gi", "not a Kubernetes quantity"),
        ("NaN", "not a Kubernetes quantity"),
        ("Infinity", "not a Kubernetes quantity"),
        ("1e31", "out of range"),
        ("٢٠Gi", "not a Kubernetes quantity"),  # Arabic-Indic digits
        ("２０Gi", "not a Kubernetes quantity"),  # fullwidth digits
        ("1e٣", "not a Kubernetes quantity"),
        (True, "not a memory quantity"),
        (1.5, "not a memory quantity"),
        (None, "not a memory quantity"),
    ],
    ids=repr,
)
def test_bad_quantities_are_refused_with_a_message(text: object, fragment: str) -> None:
    with pytest.raises(errors.QuantityError) as info:
        quantities.parse_bytes(text)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert repr(text) in str(info.value) or str(text) in str(info.value)


def test_a_quantity_error_is_a_bad_request() -> None:
    with pytest.raises(errors.BadRequest):
        quantities.parse_bytes("500m")


@given(strategies.memory_quantities())
def test_agrees_with_the_kubernetes_client(text: str) -> None:
    with localcontext(prec=100):  # the client computes in the caller's context: make it exact
        expected = math.ceil(parse_quantity(text))
    assert quantities.parse_bytes(text) == expected


@given(strategies.byte_sizes())
def test_to_quantity_round_trips(n: int) -> None:
    text = quantities.to_quantity(n)
    assert quantities.parse_bytes(text) == n
    assert parse_quantity(text) == Decimal(n)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (20 * GI, "20Gi"),
        (1536 * MI, "1536Mi"),
        (100, "100"),
        (0, "0"),
        (KI**4, "1Ti"),
        (3 * KI, "3Ki"),
    ],
    ids=str,
)
def test_to_quantity_picks_the_largest_exact_suffix(n: int, text: str) -> None:
    assert quantities.to_quantity(n) == text


@given(strategies.byte_sizes(), strategies.unit_sizes())
def test_requests_round_up_to_whole_units(n: int, unit: int) -> None:
    units = quantities.to_units(n, unit)
    assert units * unit >= n
    assert (units - 1) * unit < n or n == 0


@given(strategies.byte_sizes(), strategies.unit_sizes())
def test_card_capacity_rounds_down_to_whole_units(n: int, unit: int) -> None:
    units = quantities.card_units(n, unit)
    assert units * unit <= n < (units + 1) * unit


@pytest.mark.parametrize(
    ("request_bytes", "unit", "units"),
    [
        (20 * GI, GI, 20),
        (20 * GI + 1, GI, 21),
        (1536 * MI, GI, 2),
        (1536 * MI, 512 * MI, 3),
        (1, GI, 1),
        (0, GI, 0),
    ],
    ids=["exact", "one-byte-over", "1.5Gi-in-Gi", "1.5Gi-in-512Mi", "one-byte", "nothing"],
)
def test_request_units_table(request_bytes: int, unit: int, units: int) -> None:
    assert quantities.to_units(request_bytes, unit) == units


@pytest.mark.parametrize(
    ("unit", "card", "fragment"),
    [
        (32 * MI, None, "under the minimum of 64 MiB"),
        (64 * MI - 1, None, "under the minimum of 64 MiB"),
        (0, None, "under the minimum"),
        (64 * MI, 50_001 * 64 * MI, "at most 50000"),
        (GI, 50_001 * GI, "use at least"),
    ],
    ids=["32Mi", "just-under-64Mi", "zero", "64Mi-on-a-huge-card", "1Gi-on-a-huger-card"],
)
def test_unsuitable_units_are_refused(unit: int, card: int | None, fragment: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        quantities.check_unit(unit, largest_card_bytes=card)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("unit", "card"),
    [(64 * MI, None), (64 * MI, 80 * GI), (GI, 141 * GI), (GI, 50_000 * GI)],
    ids=["64Mi", "64Mi-on-H100", "1Gi-on-H200", "exactly-50000-units"],
)
def test_suitable_units_pass(unit: int, card: int | None) -> None:
    quantities.check_unit(unit, largest_card_bytes=card)


@given(strategies.unit_sizes(), st.sampled_from(strategies.CARD_SIZES))
def test_an_accepted_unit_gives_a_card_at_most_50000_ids(unit: int, card: int) -> None:
    quantities.check_unit(unit, largest_card_bytes=card)
    assert quantities.card_units(card, unit) <= quantities.MAX_UNITS_PER_CARD


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (20 * GI, "20 GiB"),
        (1536 * MI, "1.5 GiB"),
        (512 * MI, "512 MiB"),
        (100, "100 B"),
        (716 * MI, "716 MiB"),
        (80 * GI, "80 GiB"),
        (2 * KI**4, "2 TiB"),
    ],
    ids=str,
)
def test_sizes_for_people(n: int, text: str) -> None:
    assert quantities.format_bytes(n) == text
