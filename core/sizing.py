"""The vLLM arithmetic: how much of a card a granted instance may ask vLLM for.

vLLM's ``--gpu-memory-utilization`` is a fraction of the card's CUDA-visible total (NVML total
minus the driver's reserved part). Its budget holds weights, activations, CUDA graphs and the KV
cache; the process's CUDA context (~0.6 GiB measured on an H100) lies outside it. The driver (MPS)
enforces the grant including that context, so the budget is ``grant - reserve``.

Under per-cgroup driver limits (isolation ``cgroup``) CUDA reports the container's limit as the
device's total, so there the fraction is of the grant itself (:func:`cuda_total_seen`).
"""

import math
from decimal import Decimal
from typing import Final

from gpushare.core import errors
from gpushare.core.config import Isolation
from gpushare.core.quantities import format_bytes

PRECISION: Final = 4
"""Decimal places handed to vLLM: 0.0001 of an 80 GB card is 8 MB, finer than any allocation."""

_STEP: Final = Decimal(1).scaleb(-PRECISION)
_LARGEST: Final = 1 - _STEP


def cuda_total_seen(*, isolation: Isolation, granted_bytes: int, cuda_total_bytes: int) -> int:
    """The total CUDA shows a granted container: its grant under ``cgroup`` (the hard limit is the
    device's total there), else the card's CUDA total."""
    return granted_bytes if isolation == "cgroup" else cuda_total_bytes


def utilization(*, granted_bytes: int, reserve_bytes: int, cuda_total_bytes: int) -> Decimal:
    """The utilization to hand vLLM: ``(granted - reserve) / cuda_total``, rounded down into (0, 1).

    Raises :class:`BadRequest` when the grant does not exceed the reserve.
    """
    if cuda_total_bytes <= 0:
        raise errors.BadRequest(f"card total must be positive, got {cuda_total_bytes}")
    budget = granted_bytes - reserve_bytes
    if budget <= 0:
        raise errors.BadRequest(
            f"a grant of {format_bytes(granted_bytes)} leaves nothing for vLLM after the"
            f" per-instance reserve of {format_bytes(reserve_bytes)}: ask for more than"
            f" {format_bytes(reserve_bytes)}"
        )
    steps = math.floor(Decimal(budget) / Decimal(cuda_total_bytes) / _STEP)
    value = min(Decimal(steps) * _STEP, _LARGEST)
    if value <= 0:
        raise errors.BadRequest(
            f"a grant of {format_bytes(granted_bytes)} gives vLLM under {_STEP} of a"
            f" {format_bytes(cuda_total_bytes)} card: ask for more"
        )
    return value


def budget_bytes(value: Decimal, cuda_total_bytes: int) -> int:
    """The bytes vLLM budgets at ``value`` on a card of ``cuda_total_bytes``."""
    return int(value * cuda_total_bytes)


def format_utilization(value: Decimal) -> str:
    """The string form for vLLM's flag: ``0.2440``."""
    return f"{value:.{PRECISION}f}"
