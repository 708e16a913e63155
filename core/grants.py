"""What one card can grant, by isolation mode: one arithmetic for the webhook's ceiling, the
extender's fit and the device plugin's capacity.

Card memory that no grant may use comes in two kinds. In ``mps`` every allocation runs its own
``nvidia-cuda-mps-server`` (``agent.mps_server_bytes`` each), so each grant costs its bytes plus one
server. In ``mps-shared`` one server serves the card whatever the number of grants, so the card
offers its CUDA total less one server. ``cgroup`` and ``none`` run no server. ``auto`` counts as
``mps``: a node may pick it, and the webhook and extender do not know which nodes will.
"""

from dataclasses import dataclass

from gpushare.core import errors, names, quantities


@dataclass(frozen=True, slots=True)
class Overheads:
    """Card memory outside every grant: once per card, and once per allocation."""

    per_card: int
    per_allocation: int


def overheads(isolation: str, mps_server_bytes: int) -> Overheads:
    """The overheads of an isolation setting (``auto`` counted as ``mps``)."""
    if isolation in ("mps", "auto"):
        return Overheads(per_card=0, per_allocation=mps_server_bytes)
    if isolation == "mps-shared":
        return Overheads(per_card=mps_server_bytes, per_allocation=0)
    return Overheads(per_card=0, per_allocation=0)


def grantable_bytes(cuda_total_bytes: int, costs: Overheads) -> int:
    """What grants and their per-allocation overheads may use of a card."""
    return max(cuda_total_bytes - costs.per_card, 0)


def largest_grant_bytes(cuda_total_bytes: int, unit_bytes: int, costs: Overheads) -> int:
    """The largest grant an idle card holds: whole units of what is left after the overheads."""
    room = max(grantable_bytes(cuda_total_bytes, costs) - costs.per_allocation, 0)
    return quantities.card_units(room, unit_bytes) * unit_bytes


def compute_share(value: object) -> int:
    """The ``gpushare.io/compute-share`` value as a whole percentage, 1 to 100 (``"30"`` or
    ``"30%"``); :class:`~gpushare.core.errors.BadRequest` saying what to write otherwise."""
    text = str(value).strip().removesuffix("%").strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 100:
        return int(text)
    raise errors.BadRequest(
        f"{names.ANNOTATION_COMPUTE_SHARE}: {value!r} is not a share of the card's compute;"
        ' write a whole percentage from 1 to 100, such as "30"'
    )
