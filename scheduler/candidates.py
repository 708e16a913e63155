"""The candidate nodes of a filter or prioritize call, parsed once and then reused.

kube-scheduler names the same nodes again and again: each filter call of a scheduling cycle sends
every feasible node, and the prioritize call after it sends exactly the names the filter let
through. :class:`gpushare.scheduler.wire.Memo` keeps recent lists by their raw JSON bytes,
including each list this extender answered a filter with, so that most calls skip parsing
thousands of names. A :class:`Candidates` carries what the hot paths derive from its names once:
a NumPy array of them, whether they can be written into JSON without escaping, the ledger's slot
of each, and the lists a filter left of it.
"""

import json
import re
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["Candidates", "Slots"]

Slots = npt.NDArray[np.intp]

SUBSETS_KEPT: Final = 16
"""Filtered lists remembered per list: one or two per pod size in use is plenty."""

_NEEDS_ESCAPE: Final = re.compile(r'["\\\x00-\x1f]')


class Candidates:
    """An immutable list of node names, with what the hot paths derive from it, made once."""

    __slots__ = ("__weakref__", "_array", "_json", "_plain", "_slots", "_subsets", "names")

    def __init__(
        self, names: list[str], *, raw: bytes | None = None, plain: bool | None = None
    ) -> None:
        """``raw``: the names' JSON as received; ``plain``: known already (see :attr:`plain`)."""
        self.names = names
        """The names in kube-scheduler's order; never changed after construction."""
        self._json = raw
        self._array: npt.NDArray[np.object_] | None = None
        self._plain = plain
        self._slots: tuple[object, int, Slots] | None = None
        self._subsets: dict[bytes, Candidates] = {}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def array(self) -> npt.NDArray[np.object_]:
        """The names as a NumPy object array, for selecting many at once."""
        if self._array is None:
            array = np.empty(len(self.names), dtype=object)
            array[:] = self.names
            self._array = array
        return self._array

    @property
    def plain(self) -> bool:
        """Whether every name can go between JSON quotes as it is (node names always can)."""
        if self._plain is None:
            if self._json is not None:
                # Valid JSON holds no raw control characters, and a quote needs a backslash.
                self._plain = self._json.isascii() and b"\\" not in self._json
            else:
                joined = "".join(self.names)
                self._plain = joined.isascii() and _NEEDS_ESCAPE.search(joined) is None
        return self._plain

    def json(self) -> bytes:
        """The names as a compact JSON array, as kube-scheduler writes ``NodeNames``."""
        if self._json is None:
            if not self.names:
                self._json = b"[]"
            elif self.plain:
                self._json = ('["' + '","'.join(self.names) + '"]').encode()
            else:
                self._json = json.dumps(self.names, separators=(",", ":")).encode()
        return self._json

    def without(self, positions: npt.NDArray[np.intp]) -> "Candidates":
        """The candidates less those at ``positions``, keeping what is known of them.

        The same positions give the same object back, so its JSON, slots and memo entry are
        reused: between two filters of a size, usually no node crossed the line.
        """
        key = positions.tobytes()
        kept = self._subsets.get(key)
        if kept is None:
            array = np.delete(self.array, positions)
            kept = Candidates(array.tolist(), plain=self.plain or None)
            kept._array = array
            if self._slots is not None:
                owner, version, slots = self._slots
                kept._slots = (owner, version, np.delete(slots, positions))
            if len(self._subsets) >= SUBSETS_KEPT:
                self._subsets.clear()
            self._subsets[key] = kept
        return kept

    def slots(self, owner: object, version: int) -> Slots | None:
        """The slots ``owner`` stored for its table ``version``, if it stored them."""
        cached = self._slots
        if cached is not None and cached[0] is owner and cached[1] == version:
            return cached[2]
        return None

    def keep_slots(self, owner: object, version: int, slots: Slots) -> None:
        """Remember the slot of each name in ``owner``'s table ``version``."""
        self._slots = (owner, version, slots)
