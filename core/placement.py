"""The placement policy as pure functions: which cards fit a request, and in which order.

A card's room is what the ledger has not granted, less memory in use beyond every grant (another
process the agent sees), less the per-allocation overhead (one MPS server per grant in ``mps``
mode). Binpack, spread and fill are orderings over the same fit.

``fill`` (the default) packs by share of the card, and opens a card only when no card in use
holds the request: it fills the cards that already hold grants, fullest share first, and of the
empty cards it opens the one the request fills most (the smallest that fits). ``binpack`` takes
the card with the fewest bytes left; on a fleet of mixed sizes that sends small requests to
small empty cards while larger cards in use still have room, so more cards end up in use.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from gpushare.core.ids import CardUUID, NodeName
from gpushare.core.quantities import format_bytes

Policy = Literal["fill", "binpack", "spread"]
POLICIES: Final[tuple[Policy, ...]] = ("fill", "binpack", "spread")
DEFAULT_POLICY: Final[Policy] = "fill"
MAX_SCORE: Final = 10
"""kube-scheduler's extender scores run from 0 to 10 (MaxExtenderPriority)."""


@dataclass(frozen=True, slots=True)
class Card:
    """A card as the ledger sees it."""

    node: NodeName
    uuid: CardUUID
    index: int
    capacity_bytes: int
    """Memory grants may use: CUDA-visible total (NVML total less the driver's reserve)."""
    granted_bytes: int = 0
    """Sum of grants and per-allocation overheads on this card."""
    free_bytes: int | None = None
    """The agent's reported free memory; ``None`` when not known."""
    healthy: bool = True

    @property
    def foreign_bytes(self) -> int:
        """Memory in use beyond every grant (from the agent's report)."""
        if self.free_bytes is None:
            return 0
        return max(0, self.capacity_bytes - self.free_bytes - self.granted_bytes)

    @property
    def room_bytes(self) -> int:
        """What a new grant may still take."""
        return max(0, self.capacity_bytes - self.granted_bytes - self.foreign_bytes)

    @property
    def in_use(self) -> bool:
        """Whether the card holds a grant already (opening it costs nothing more)."""
        return self.granted_bytes > 0


@dataclass(frozen=True, slots=True)
class Fit:
    """A card that holds the request, and what it keeps after."""

    card: Card
    cost_bytes: int

    @property
    def room_after(self) -> int:
        return self.card.room_bytes - self.cost_bytes


@dataclass(frozen=True, slots=True)
class Miss:
    """A card that does not hold the request, and why."""

    card: Card
    reason: str


def cost(request_bytes: int, overhead_bytes: int) -> int:
    """What one allocation takes from a card: the grant plus the per-allocation overhead."""
    return request_bytes + overhead_bytes


def check(card: Card, request_bytes: int, *, overhead_bytes: int = 0) -> Fit | Miss:
    """Whether one card holds the request."""
    if not card.healthy:
        return Miss(card, f"GPU {card.index} is unhealthy")
    need = cost(request_bytes, overhead_bytes)
    if card.room_bytes < need:
        return Miss(card, f"GPU {card.index} has {format_bytes(card.room_bytes)} free")
    return Fit(card, need)


def split(
    cards: Iterable[Card], request_bytes: int, *, overhead_bytes: int = 0
) -> tuple[list[Fit], list[Miss]]:
    """The cards that fit and the ones that miss, each miss with its reason."""
    fits: list[Fit] = []
    misses: list[Miss] = []
    for card in cards:
        outcome = check(card, request_bytes, overhead_bytes=overhead_bytes)
        (fits if isinstance(outcome, Fit) else misses).append(outcome)  # type: ignore[arg-type]
    return fits, misses


def explain(misses: Sequence[Miss], request_bytes: int) -> str:
    """One line a person understands: ``no card with 20 GiB free: best is GPU 3 with 12 GiB``."""
    if not misses:
        return "node has no gpushare cards"
    healthy = [miss.card for miss in misses if miss.card.healthy]
    if not healthy:
        return f"all {len(misses)} GPUs are unhealthy"
    best = max(healthy, key=lambda card: card.room_bytes)
    return (
        f"no card with {format_bytes(request_bytes)} free:"
        f" best is GPU {best.index} with {format_bytes(best.room_bytes)}"
    )


def _binpack_key(fit: Fit) -> tuple[int, int, str, int]:
    # The fullest card that fits: least room left after placement.
    return (fit.room_after, -fit.card.capacity_bytes, fit.card.node, fit.card.index)


def _spread_key(fit: Fit) -> tuple[float, str, int]:
    # The emptiest card: most room left, as a share of the card.
    return (-fit.room_after / fit.card.capacity_bytes, fit.card.node, fit.card.index)


def _fill_key(fit: Fit) -> tuple[bool, float, str, int]:
    # A card in use before an empty one; then the least share of the card left after placement.
    return (not fit.card.in_use, fit.room_after / fit.card.capacity_bytes, fit.card.node,
            fit.card.index)


ORDERINGS: Final[dict[Policy, Callable[[Fit], tuple[object, ...]]]] = {
    "fill": _fill_key,
    "binpack": _binpack_key,
    "spread": _spread_key,
}


def order(fits: Iterable[Fit], policy: Policy) -> list[Fit]:
    """Fits best first under ``policy``."""
    return sorted(fits, key=ORDERINGS[policy])


def best(fits: Iterable[Fit], policy: Policy) -> Fit | None:
    """The card ``policy`` prefers, or ``None``."""
    return min(fits, key=ORDERINGS[policy], default=None)


FILL_OPEN_SCORES: Final = 6
"""``fill`` scores a card in use from 4 to 10 by its share filled, an empty card from 0 to 3 (by
the share the request fills): any card in use outranks any empty one, and the 11 scores
kube-scheduler allows are shared so that both halves keep some resolution."""


def score(fit: Fit, policy: Policy) -> int:
    """An integer 0–10: how much ``policy`` likes the card (the higher, the sooner it is chosen).

    binpack scores a fuller card higher, spread an emptier one; fill any card in use above any
    empty one, and within each the fuller share higher.
    """
    filled = 1 - fit.room_after / fit.card.capacity_bytes
    if policy == "fill":
        opened = MAX_SCORE - FILL_OPEN_SCORES
        if fit.card.in_use:
            return opened + max(0, min(FILL_OPEN_SCORES, round(filled * FILL_OPEN_SCORES)))
        return max(0, min(opened - 1, round(filled * (opened - 1))))
    share = filled if policy == "binpack" else 1 - filled
    return max(0, min(MAX_SCORE, round(share * MAX_SCORE)))
