"""Device IDs: one per memory unit of a card, ``<card uuid>-<unit>``.

kubelet counts devices, not bytes, so each card offers one ID per unit and kubelet's own
accounting can never hand a card more units than it has. The ID carries the card's full UUID
(``GPU-5d3c0a0e-...-17``): NVML UUIDs are 40 characters (``GPU-`` or ``MIG-`` and a 36-character
UUID), so with up to five digits of unit an ID stays within :data:`MAX_ID_LENGTH`. The UUID, unlike
the index, survives reboots and driver reloads, so an ID always names the same card; the unit number
follows the last hyphen.
"""

from collections.abc import Iterable
from typing import Final

from gpushare.core import errors, quantities
from gpushare.core.ids import CardUUID, DeviceID

MAX_ID_LENGTH: Final = 63
"""The longest device ID we hand kubelet: a DNS label's length, safe wherever kubelet puts it."""

HEALTHY: Final = "Healthy"
UNHEALTHY: Final = "Unhealthy"
"""kubelet's device health strings (k8s.io/kubelet deviceplugin/v1beta1 constants)."""


def device_id(card: CardUUID, unit: int) -> DeviceID:
    """The ID of ``unit`` (0-based) on ``card``."""
    text = f"{card}-{unit}"
    if len(text) > MAX_ID_LENGTH:
        raise errors.ConfigError(
            f"card UUID {card!r} is too long for device IDs of at most {MAX_ID_LENGTH} characters"
        )
    return DeviceID(text)


def parse(device: str) -> tuple[CardUUID, int]:
    """Split an ID into its card and unit; a malformed ID raises :class:`BadRequest`."""
    card, sep, unit = device.rpartition("-")
    # Only the spelling device_id writes: ASCII digits, no leading zero ("A-03" is not "A-3").
    if not sep or not card or not (unit.isascii() and unit.isdigit()) or str(int(unit)) != unit:
        raise errors.BadRequest(
            f"device ID {device!r} is not of the form <card uuid>-<unit>: it was not issued by"
            " this plugin"
        )
    return CardUUID(card), int(unit)


def card_of(devices: Iterable[str]) -> CardUUID:
    """The one card that all ``devices`` belong to; IDs spanning cards raise :class:`BadRequest`."""
    cards = sorted({parse(device)[0] for device in devices})
    if not cards:
        raise errors.BadRequest("no device IDs: a container needs at least one unit")
    if len(cards) > 1:
        raise errors.BadRequest(
            f"device IDs span {len(cards)} cards ({', '.join(cards)}): a container's memory must"
            " come from one card"
        )
    return cards[0]


def unit_count(card_bytes: int, unit_bytes: int) -> int:
    """How many units a card of ``card_bytes`` grantable memory offers."""
    return min(quantities.card_units(max(card_bytes, 0), unit_bytes), quantities.MAX_UNITS_PER_CARD)


def ids_for(card: CardUUID, count: int) -> list[DeviceID]:
    """Every ID of ``card`` with ``count`` units, lowest unit first."""
    return [device_id(card, unit) for unit in range(count)]


def sort_key(device: str) -> tuple[str, int]:
    """Order IDs by card, then by unit as a number (``-2`` before ``-10``)."""
    return parse(device)
