"""The room index: every node's room in NumPy arrays, and the answers derived from them, cached.

The ledger (:mod:`gpushare.scheduler.ledger`) decides what each card holds; this index only mirrors
it so that filtering and scoring thousands of nodes costs a few vectorized steps. Each node name
ever seen has a slot; per slot the index keeps the node's best room (the most any healthy card can
still take, -1 where the node may take no pod now) and, per card, its room, its capacity and
whether it holds a grant. Scores are cached per policy and cost, failure reasons per cost, until
the node's next change (:meth:`RoomIndex.forget`). The index never decides: each of its answers
equals :mod:`gpushare.core.placement` applied to the ledger's cards, which a stateful property test
checks after every step.
"""

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from gpushare.core import placement
from gpushare.scheduler.candidates import Candidates, Slots
from gpushare.scheduler.failures import Failure

__all__ = ["FIRST_SLOTS", "RoomIndex", "Scores"]

Scores = npt.NDArray[np.int8]

_NO_ROOM: Final = -1
"""The room of a node or card that may take nothing now."""
_UNSCORED: Final = -1
_MAX_CACHE_KEYS: Final = 256
"""Caches kept, one per policy and cost; more than this and they start over."""
FIRST_SLOTS: Final = 1024
"""Slots made at first; the arrays double whenever a new name needs one past the end."""
_FIRST_CARDS: Final = 8


class RoomIndex:
    """Per node slot: best room, each card's room, size and use; scores and failures cached."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        """Each node name ever seen, its position in the arrays (0: names never seen)."""
        self._version = 0
        """Changes whenever a name gets a slot, so that candidate lists map their names again."""
        self._rooms: npt.NDArray[np.int64] = np.full(FIRST_SLOTS, _NO_ROOM, dtype=np.int64)
        """Best room of every node that may take pods now; -1 for the others and unused slots."""
        self._card_rooms = np.full((FIRST_SLOTS, _FIRST_CARDS), _NO_ROOM, dtype=np.int64)
        """Per slot, each healthy card's room (-1: unhealthy, or no such card), for scoring."""
        self._card_sizes = np.ones((FIRST_SLOTS, _FIRST_CARDS), dtype=np.int64)
        """Per slot, each card's capacity (1 where there is no card, never divided by zero)."""
        self._card_in_use = np.zeros((FIRST_SLOTS, _FIRST_CARDS), dtype=np.bool_)
        """Per slot, whether each card holds a grant already (for ``fill``)."""
        self._scores: dict[tuple[placement.Policy, int], Scores] = {}
        """Per policy and cost, each slot's score (-1: not known yet; slot 0 scores 0)."""
        self._failures: dict[int, dict[str, Failure]] = {}
        """Per cost, why each known node that was asked about cannot take it."""

    def add(self, name: str) -> None:
        """Give ``name`` a slot if it has none (its room stays -1 until :meth:`update`)."""
        if name in self._slots:
            return
        slot = self._slots[name] = len(self._slots) + 1
        self._version += 1
        if slot >= len(self._rooms):
            self._grow()

    def update(self, name: str, cards: Sequence[placement.Card], *, takes_pods: bool) -> None:
        """The node's cards now; its best room counts only while it ``takes_pods``."""
        slot = self._slots.get(name)
        if slot is None:
            return
        self.forget(name)
        self._set_cards(slot, cards)
        best = max((card.room_bytes for card in cards if card.healthy), default=_NO_ROOM)
        self._rooms[slot] = best if takes_pods else _NO_ROOM

    def close(self, name: str) -> None:
        """The node may take no pod now (its agent went silent); its cards are kept."""
        slot = self._slots.get(name)
        if slot is not None:
            self._rooms[slot] = _NO_ROOM
            self.forget(name)

    def remove(self, name: str) -> None:
        """The node is gone: nothing fits it (its slot stays, for the next node of that name)."""
        slot = self._slots.get(name)
        if slot is not None:
            self.forget(name)
            self._set_cards(slot, ())
            self._rooms[slot] = _NO_ROOM

    def forget(self, name: str) -> None:
        """Drop the node's cached scores and failure reasons: it changed."""
        slot = self._slots.get(name)
        if slot is not None:
            for cache in self._scores.values():
                cache[slot] = _UNSCORED
        for failures in self._failures.values():
            failures.pop(name, None)

    # --- questions --------------------------------------------------------------------------------

    def refusing(self, candidates: Candidates, cost: int) -> npt.NDArray[np.intp]:
        """The positions in ``candidates`` of the nodes whose best room is under ``cost``."""
        return np.flatnonzero(self._rooms[self.slots_of(candidates)] < cost)

    def failures(self, cost: int) -> dict[str, Failure]:
        """The cache of failure reasons for ``cost``, by node name (the caller fills it)."""
        cache = self._failures.get(cost)
        if cache is None:
            if len(self._failures) >= _MAX_CACHE_KEYS:
                self._failures.clear()
            cache = self._failures[cost] = {}
        return cache

    def scores(self, candidates: Candidates, cost: int, policy: placement.Policy) -> Scores:
        """Per candidate, :func:`placement.score` of the card :func:`placement.best` would pick
        for ``cost`` (0: none fits, or a name never seen)."""
        cache = self._score_cache(policy, cost)
        slots = self.slots_of(candidates)
        result = cache[slots]
        missing = np.flatnonzero(result == _UNSCORED)
        if missing.size:
            rows = slots[missing]
            fresh = _best_scores(
                self._card_rooms[rows],
                self._card_sizes[rows],
                self._card_in_use[rows],
                cost,
                policy,
            )
            result[missing] = cache[rows] = fresh
        return result

    def slots_of(self, candidates: Candidates) -> Slots:
        """Each candidate's slot, in order (0 for names never seen), mapped once per list."""
        slots = candidates.slots(self, self._version)
        if slots is None:
            get = self._slots.get
            slots = np.fromiter(
                (get(name, 0) for name in candidates.names), dtype=np.intp, count=len(candidates)
            )
            candidates.keep_slots(self, self._version, slots)
        return slots

    # --- inside -----------------------------------------------------------------------------------

    def _grow(self) -> None:
        size = len(self._rooms)
        self._rooms = np.concatenate([self._rooms, np.full(size, _NO_ROOM, dtype=np.int64)])
        self._card_rooms = np.concatenate([self._card_rooms, np.full_like(self._card_rooms, -1)])
        self._card_sizes = np.concatenate([self._card_sizes, np.ones_like(self._card_sizes)])
        self._card_in_use = np.concatenate([self._card_in_use, np.zeros_like(self._card_in_use)])
        for key, cache in self._scores.items():
            self._scores[key] = np.concatenate([cache, np.full(size, _UNSCORED, dtype=np.int8)])

    def _set_cards(self, slot: int, cards: Sequence[placement.Card]) -> None:
        width = self._card_rooms.shape[1]
        if len(cards) > width:
            extra = len(cards) - width
            self._card_rooms = np.pad(self._card_rooms, ((0, 0), (0, extra)), constant_values=-1)
            self._card_sizes = np.pad(self._card_sizes, ((0, 0), (0, extra)), constant_values=1)
            self._card_in_use = np.pad(self._card_in_use, ((0, 0), (0, extra)))
        rooms = self._card_rooms[slot]
        sizes = self._card_sizes[slot]
        in_use = self._card_in_use[slot]
        rooms[:] = _NO_ROOM
        sizes[:] = 1
        in_use[:] = False
        for column, card in enumerate(cards):
            if card.healthy:
                rooms[column] = card.room_bytes
                sizes[column] = card.capacity_bytes
                in_use[column] = card.in_use

    def _score_cache(self, policy: placement.Policy, cost: int) -> Scores:
        cache = self._scores.get((policy, cost))
        if cache is None:
            if len(self._scores) >= _MAX_CACHE_KEYS:
                self._scores.clear()
            cache = self._scores[(policy, cost)] = np.full(
                len(self._rooms), _UNSCORED, dtype=np.int8
            )
            cache[0] = 0  # names never seen
        return cache


def _best_scores(
    rooms: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    in_use: npt.NDArray[np.bool_],
    cost: int,
    policy: placement.Policy,
) -> Scores:
    """Per row of cards, :func:`placement.score` of the card :func:`placement.best` would pick.

    The same choice and the same arithmetic, for thousands of nodes in a few NumPy steps: fill
    takes the least share left after the grant among the cards in use, else among the empty
    ones; binpack the least room left after the grant, and of those the largest card; spread the
    largest share of its card left after. Cards that cannot hold ``cost`` (room -1 when unhealthy)
    score nothing; a row without one scores 0.
    """
    fits = rooms >= cost
    after = np.where(fits, rooms - cost, 0)
    if policy == "fill":
        left = np.where(fits, after / sizes, np.inf)
        opened_left = np.where(in_use, left, np.inf).min(axis=1)
        empty_left = left.min(axis=1)
        opened = np.isfinite(opened_left)
        top = placement.MAX_SCORE - placement.FILL_OPEN_SCORES
        scores = np.where(
            opened,
            top
            + np.clip(
                np.rint((1 - opened_left) * placement.FILL_OPEN_SCORES),
                0,
                placement.FILL_OPEN_SCORES,
            ),
            np.clip(np.rint((1 - empty_left) * (top - 1)), 0, top - 1),
        )
        return np.where(fits.any(axis=1), scores, 0).astype(np.int8)
    if policy == "binpack":
        least = np.where(fits, after, np.iinfo(np.int64).max).min(axis=1)
        size = np.where(fits & (after == least[:, None]), sizes, 0).max(axis=1)
        share = 1 - least / np.maximum(size, 1)
    else:
        share = 1 - (1 - np.where(fits, after / sizes, -1.0).max(axis=1))
    scores = np.clip(np.rint(share * placement.MAX_SCORE), 0, placement.MAX_SCORE)
    return np.where(fits.any(axis=1), scores, 0).astype(np.int8)
