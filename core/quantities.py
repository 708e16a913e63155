"""Kubernetes quantities as memory sizes, and the cluster's memory unit.

We parse quantities ourselves rather than with ``kubernetes.utils.parse_quantity``: the core must
stay free of the Kubernetes client (an import-linter contract), and ``parse_quantity`` accepts
sub-byte suffixes (``500m``) and returns fractional ``Decimal`` values that are meaningless for
memory. The tests check that both agree on every valid memory quantity.
"""

import math
import re
from decimal import Decimal, InvalidOperation, localcontext
from typing import Final

from gpushare.core import errors

KI: Final = 1024
MI: Final = 1024**2
GI: Final = 1024**3

_BINARY: Final = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL: Final = {"": 0, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SUB_UNIT: Final = ("m", "u", "n")

# Kubernetes' grammar: sign, digits with an optional fraction, then a binary suffix, a decimal
# suffix or a decimal exponent (``2e9``).
_QUANTITY: Final = re.compile(
    r"^(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])|[eE](?P<exp>[+-]?\d+))?$",
    re.ASCII,  # Kubernetes reads only 0-9: "٢٠Gi" and "２０Gi" are no quantities
)

MIN_UNIT_BYTES: Final = 64 * MI
"""Below 64 MiB a unit is smaller than one CUDA context: pointless bookkeeping."""

MAX_UNITS_PER_CARD: Final = 50_000
"""kubelet lists one device ID per unit; 50,000 IDs of ~50 bytes stay far under its 4 MB message."""


def parse_bytes(text: str | int) -> int:
    """Parse a Kubernetes quantity as a whole number of bytes (fractions round up, like kubelet).

    >>> parse_bytes("20Gi"), parse_bytes("1.5Gi"), parse_bytes("2e9")
    (21474836480, 1610612736, 2000000000)
    """
    if isinstance(text, bool):
        raise errors.QuantityError(f"{text!r} is not a memory quantity; write e.g. \"20Gi\"")
    if isinstance(text, int):
        if text < 0:
            raise errors.QuantityError(f"{text} is negative; memory must be positive: \"20Gi\"")
        return text
    if not isinstance(text, str):
        raise errors.QuantityError(f"{text!r} is not a memory quantity; write e.g. \"20Gi\"")
    stripped = text.strip()
    match = _QUANTITY.match(stripped)
    if match is None:
        raise errors.QuantityError(
            f"{text!r} is not a Kubernetes quantity; write a size such as \"20Gi\", \"20480Mi\" or"
            " \"21474836480\""
        )
    suffix = match["suffix"] or ""
    if suffix in _SUB_UNIT:
        raise errors.QuantityError(
            f"{text!r} uses the sub-unit suffix {suffix!r}, which means fractions of a byte;"
            " memory takes Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T: write e.g. \"20Gi\""
        )
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise errors.QuantityError(f"{text!r} is not a number") from exc
    if number < 0:
        raise errors.QuantityError(f"{text!r} is negative; memory must be positive, e.g. \"20Gi\"")
    if match["exp"] is not None and abs(int(match["exp"])) > 30:
        raise errors.QuantityError(f"{text!r} is out of range for a memory size")
    with localcontext() as exact:
        # The default 28 digits would round a long fraction away before the ceiling: keep every
        # digit of the number plus the 19 of the largest multiplier (1024**6).
        exact.prec = len(stripped) + 19
        if match["exp"] is not None:
            value = number.scaleb(int(match["exp"]))
        elif suffix in _BINARY:
            value = number * (KI ** _BINARY[suffix])
        else:
            value = number * (1000 ** _DECIMAL[suffix])
        return math.ceil(value)


def format_bytes(n: int) -> str:
    """A size for people: ``20 GiB``, ``1.5 GiB``, ``512 MiB``, ``100 B``."""
    for unit, size in (("TiB", KI**4), ("GiB", GI), ("MiB", MI), ("KiB", KI)):
        if abs(n) >= size:
            value = n / size
            if value >= 100:
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"


def to_quantity(n: int) -> str:
    """The shortest exact Kubernetes quantity for ``n`` bytes: ``20Gi``, ``1536Mi``, ``100``."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        size = KI ** _BINARY[suffix]
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def check_unit(unit_bytes: int, *, largest_card_bytes: int | None = None) -> None:
    """Refuse a memory unit that is too small to matter or splits a card into too many IDs."""
    if unit_bytes < MIN_UNIT_BYTES:
        raise errors.ConfigError(
            f"a unit of {format_bytes(unit_bytes)} is under the minimum of"
            f" {format_bytes(MIN_UNIT_BYTES)}: use 64Mi or more (1Gi is the default)"
        )
    if largest_card_bytes is not None and largest_card_bytes // unit_bytes > MAX_UNITS_PER_CARD:
        smallest = math.ceil(largest_card_bytes / MAX_UNITS_PER_CARD)
        raise errors.ConfigError(
            f"a unit of {format_bytes(unit_bytes)} would split a {format_bytes(largest_card_bytes)}"
            f" card into {largest_card_bytes // unit_bytes} units (at most {MAX_UNITS_PER_CARD}):"
            f" use at least {format_bytes(smallest)}"
        )


def to_units(n_bytes: int, unit_bytes: int) -> int:
    """Whole units covering ``n_bytes`` (a request rounds up)."""
    return -(-n_bytes // unit_bytes)


def card_units(total_bytes: int, unit_bytes: int) -> int:
    """Whole units a card of ``total_bytes`` offers (capacity rounds down)."""
    return total_bytes // unit_bytes
