"""``HostPriorityList`` answers, written once per candidate list and then patched in place.

A prioritize answer over thousands of nodes is mostly the answer before it: between two pods of a
size, a bind changed one node or none. So each answer is kept as a buffer in which every score
takes two bytes at a known offset (``"Score": 7`` and ``"Score":10`` are both JSON), and the next
answer for the same list, policy and size rewrites only the scores that changed.
"""

import json
import weakref
from typing import Final

import numpy as np

from gpushare.core import placement
from gpushare.scheduler.candidates import Candidates
from gpushare.scheduler.ledger import Scores

__all__ = ["PriorityList", "PriorityLists"]

_HOST: Final = '{"Host":"'
_SCORE: Final = '","Score":'
_DIGITS: Final = tuple(f"{score:>2}".encode() for score in range(placement.MAX_SCORE + 1))
_PATCH_SHARE: Final = 0.25
"""Above this share of changed scores, the buffer is written anew rather than patched."""
_KEPT_PER_LIST: Final = 16


class PriorityList:
    """The answer for one candidate list under one policy and size, as its scores change."""

    __slots__ = ("_buffer", "_names", "_offsets", "_scores")

    def __init__(self, candidates: Candidates) -> None:
        names = (
            candidates.names
            if candidates.plain
            else [json.dumps(name)[1:-1] for name in candidates.names]
        )
        self._names = names
        entry = np.fromiter(map(len, names), dtype=np.intp, count=len(names))
        entry += len(_HOST) + len(_SCORE) + 2 + 1 + 1  # two digits, "}" and ","
        starts = np.concatenate(([1], 1 + np.cumsum(entry)[:-1])).astype(np.intp)
        self._offsets = starts + entry - 4  # the two digits, before "}" and ","
        self._buffer = bytearray()
        self._scores: Scores | None = None

    def write(self, scores: Scores) -> bytes:
        """The JSON answer for ``scores`` (one per candidate, in order)."""
        if not self._names:
            return b"[]"
        previous = self._scores
        changed = None if previous is None else np.flatnonzero(previous != scores)
        if changed is None or changed.size > _PATCH_SHARE * len(self._names):
            self._rewrite(scores)
        else:
            buffer, offsets = self._buffer, self._offsets
            for i in changed.tolist():
                at = int(offsets[i])
                buffer[at : at + 2] = _DIGITS[scores[i]]
        self._scores = scores.copy()
        return bytes(self._buffer)

    def _rewrite(self, scores: Scores) -> None:
        tails = [_SCORE + digits.decode() + "}," + _HOST for digits in _DIGITS]
        pieces = np.empty(2 * len(self._names), dtype=object)
        pieces[0::2] = self._names
        pieces[1::2] = np.array(tails, dtype=object)[scores]
        pieces[-1] = _SCORE + _DIGITS[scores[-1]].decode() + "}"
        self._buffer = bytearray(("[" + _HOST + "".join(pieces.tolist()) + "]").encode())


class PriorityLists:
    """The answers kept per candidate list (for as long as the list itself is kept)."""

    def __init__(self) -> None:
        self._lists: weakref.WeakKeyDictionary[
            Candidates, dict[tuple[placement.Policy, int], PriorityList]
        ] = weakref.WeakKeyDictionary()

    def write(
        self, candidates: Candidates, scores: Scores, *, policy: placement.Policy, key: int
    ) -> bytes:
        """The answer for ``candidates`` under ``policy`` for request ``key`` (its size)."""
        kept = self._lists.get(candidates)
        if kept is None:
            kept = self._lists[candidates] = {}
        answer = kept.get((policy, key))
        if answer is None:
            if len(kept) >= _KEPT_PER_LIST:
                kept.clear()
            answer = kept[(policy, key)] = PriorityList(candidates)
        return answer.write(scores)
