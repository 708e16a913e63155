"""The vLLM arithmetic: the ``--gpu-memory-utilization`` handed to a granted instance."""

from decimal import Decimal

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gpushare.core import errors, sizing
from gpushare.core.quantities import GI, MI

# An H100 80GB HBM3 as measured: NVML total 81,559 MiB, CUDA (and vLLM) sees 79.18 GiB.
H100_CUDA_TOTAL = int(79.18 * GI)
RESERVE = 716 * MI


@pytest.mark.parametrize(
    ("granted", "reserve", "total", "expected"),
    [
        # (20 GiB - 716 MiB) / 79.18 GiB = 0.24375... -> 0.2437
        (20 * GI, RESERVE, H100_CUDA_TOTAL, "0.2437"),
        # (8 GiB - 716 MiB) / 79.18 GiB = 0.09220... -> 0.0922
        (8 * GI, RESERVE, H100_CUDA_TOTAL, "0.0922"),
        # (20 GiB - 0.7 GiB) / 79.18 GiB = 0.24374... (DESIGN's measured vLLM start) -> 0.2437
        (20 * GI, int(0.7 * GI), H100_CUDA_TOTAL, "0.2437"),
        # 12 GiB on a 24 GiB card with a 1 GiB reserve: 11/24 = 0.458333 -> 0.4583
        (12 * GI, GI, 24 * GI, "0.4583"),
        # a whole card and more: capped just under 1
        (80 * GI, RESERVE, H100_CUDA_TOTAL, "0.9999"),
        (200 * GI, 0, 80 * GI, "0.9999"),
        # exactly half: no rounding needed
        (41 * GI, GI, 80 * GI, "0.5000"),
    ],
    ids=[
        "20Gi-on-H100",
        "8Gi-on-H100",
        "measured-0.7Gi-reserve",
        "L4-half",
        "whole-card",
        "more-than-card",
        "exact-half",
    ],
)
def test_utilization_table(granted: int, reserve: int, total: int, expected: str) -> None:
    value = sizing.utilization(granted_bytes=granted, reserve_bytes=reserve, cuda_total_bytes=total)
    assert sizing.format_utilization(value) == expected


@st.composite
def _grants(draw: st.DrawFn) -> tuple[int, int, int]:
    total = draw(st.integers(min_value=GI, max_value=256 * GI))
    reserve = draw(st.integers(min_value=0, max_value=4 * GI))
    # A budget of at least 1/10,000 of the card: anything less is refused (tested below).
    granted = draw(
        st.integers(min_value=reserve + -(-total // 10_000), max_value=reserve + 2 * total)
    )
    return granted, reserve, total


@given(_grants())
def test_utilization_stays_inside_the_grant(case: tuple[int, int, int]) -> None:
    granted, reserve, total = case
    value = sizing.utilization(granted_bytes=granted, reserve_bytes=reserve, cuda_total_bytes=total)
    assert 0 < value < 1
    assert value * total + reserve <= granted
    assert sizing.budget_bytes(value, total) + reserve <= granted


@given(_grants())
def test_utilization_rounds_down_to_four_places(case: tuple[int, int, int]) -> None:
    granted, reserve, total = case
    value = sizing.utilization(granted_bytes=granted, reserve_bytes=reserve, cuda_total_bytes=total)
    step = Decimal("0.0001")
    assert value == value.quantize(step)
    exact = Decimal(granted - reserve) / Decimal(total)
    assert value <= exact
    assert value == Decimal("0.9999") or exact < value + step
    assert Decimal(sizing.format_utilization(value)) == value


@given(st.integers(min_value=0, max_value=8 * GI), st.integers(min_value=0, max_value=8 * GI))
def test_a_grant_within_the_reserve_is_refused(granted: int, reserve: int) -> None:
    assume(granted <= reserve)
    with pytest.raises(errors.BadRequest, match="per-instance reserve") as info:
        sizing.utilization(granted_bytes=granted, reserve_bytes=reserve, cuda_total_bytes=80 * GI)
    assert "ask for more than" in str(info.value)


def test_a_budget_under_one_step_of_the_card_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="ask for more"):
        sizing.utilization(
            granted_bytes=RESERVE + MI, reserve_bytes=RESERVE, cuda_total_bytes=80 * GI
        )


@pytest.mark.parametrize("total", [0, -1], ids=["zero", "negative"])
def test_a_card_without_memory_is_refused(total: int) -> None:
    with pytest.raises(errors.BadRequest, match="card total must be positive"):
        sizing.utilization(granted_bytes=20 * GI, reserve_bytes=RESERVE, cuda_total_bytes=total)


@pytest.mark.parametrize(
    ("isolation", "expected"),
    [("cgroup", "0.9650"), ("mps", "0.2437"), ("mps-shared", "0.2437"), ("none", "0.2437")],
)
def test_under_a_cgroup_limit_the_fraction_is_of_the_grant(isolation: str, expected: str) -> None:
    # CUDA reports a cgroup's hard limit as the device total: (20 GiB - 716 MiB) / 20 GiB = 0.96503.
    total = sizing.cuda_total_seen(
        isolation=isolation,  # type: ignore[arg-type]
        granted_bytes=20 * GI,
        cuda_total_bytes=H100_CUDA_TOTAL,
    )
    value = sizing.utilization(granted_bytes=20 * GI, reserve_bytes=RESERVE, cuda_total_bytes=total)
    assert sizing.format_utilization(value) == expected
    assert sizing.budget_bytes(value, total) + RESERVE <= 20 * GI
