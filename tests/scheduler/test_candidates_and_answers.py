"""The extender's fast paths give exactly what the plain ones would: candidate lists parsed in
parts and reused, filtered lists derived from their parents, and prioritize answers patched in
place, all checked against a general JSON decoder and a from-scratch computation."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushare.core import errors
from gpushare.scheduler import wire
from gpushare.scheduler.candidates import Candidates
from gpushare.scheduler.priorities import PriorityList, PriorityLists
from tests.scheduler.objects import pod

NODE_NAMES = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
ANY_NAMES = st.text(min_size=1, max_size=12)
"""Names kube-scheduler would never send, but the wire allows: quotes, backslashes, controls."""
NAME_LISTS = st.lists(st.one_of(NODE_NAMES, ANY_NAMES), max_size=30, unique=True)


def _decoded(answer: bytes) -> list[tuple[str, int]]:
    return [(entry["Host"], entry["Score"]) for entry in json.loads(answer)]


@given(names=NAME_LISTS, rounds=st.lists(st.lists(st.integers(0, 10)), min_size=1, max_size=6))
def test_a_patched_priority_list_decodes_to_the_latest_scores(
    names: list[str], rounds: list[list[int]]
) -> None:
    answer = PriorityList(Candidates(names))
    for round_ in rounds:
        scores = np.array((round_ * (len(names) + 1))[: len(names)] or [0] * len(names))
        scores = scores.astype(np.int8)
        assert _decoded(answer.write(scores)) == list(zip(names, scores.tolist(), strict=True))


def test_one_changed_score_patches_only_its_own_entry() -> None:
    names = [f"node-{i}" for i in range(100)]
    answers = PriorityLists()
    candidates = Candidates(names)
    scores = np.full(100, 7, dtype=np.int8)
    first = answers.write(candidates, scores, policy="binpack", key=1)
    scores[42] = 10
    second = answers.write(candidates, scores, policy="binpack", key=1)
    assert len(first) == len(second)
    assert _decoded(second)[42] == ("node-42", 10)
    assert sum(a != b for a, b in zip(first, second, strict=True)) == 2  # " 7" became "10"


@given(names=NAME_LISTS, data=st.data())
def test_a_filtered_list_keeps_its_parents_names_json_and_slots(
    names: list[str], data: st.DataObject
) -> None:
    parent = Candidates(names)
    owner = object()
    parent.keep_slots(owner, 3, np.arange(len(names), dtype=np.intp))
    positions = st.integers(0, len(names) - 1) if names else st.nothing()
    dropped = sorted(data.draw(st.sets(positions)))
    kept = parent.without(np.array(dropped, dtype=np.intp))
    expected = [name for i, name in enumerate(names) if i not in dropped]
    assert kept.names == expected
    assert json.loads(kept.json()) == expected
    slots = kept.slots(owner, 3)
    assert slots is not None
    assert slots.tolist() == [names.index(name) for name in expected]
    assert parent.without(np.array(dropped, dtype=np.intp)) is kept


@given(names=NAME_LISTS)
def test_args_parsed_in_parts_equal_args_parsed_whole(names: list[str]) -> None:
    body = json.dumps({"Pod": pod("p", 4), "Nodes": None, "NodeNames": names}).encode()
    memo = wire.Memo()
    for _ in range(2):  # the second time, both parts come from the memo
        args, candidates = wire.parse_args(body, memo)
        whole = wire.parse(wire.ExtenderArgs, body)
        assert args.pod == whole.pod
        assert candidates.names == whole.node_names == names


def test_a_list_the_filter_answered_with_is_not_parsed_again() -> None:
    memo = wire.Memo()
    passed = Candidates(["a", "b"])
    memo.remember(passed)
    body = b'{"Pod":' + json.dumps(pod("p", 4)).encode() + b',"NodeNames":["a","b"]}'
    _, candidates = wire.parse_args(body, memo)
    assert candidates is passed


def test_a_body_with_a_nested_names_key_is_parsed_whole_and_refused_clearly() -> None:
    body = b'{"Pod":' + json.dumps(pod("p", 4)).encode() + b',"NodeNames":[{"NodeNames":["x"]}]}'
    with pytest.raises(errors.BadRequest, match=r"NodeNames\.0: Input should be a valid string"):
        wire.parse_args(body, wire.Memo())


def test_recent_values_drop_the_least_recently_used_and_match_equal_bytes() -> None:
    recent = wire.Recent[int](2)
    recent.put(b"a", 1)
    recent.put(b"b", 2)
    assert recent.get(bytes(bytearray(b"a"))) == 1  # an equal copy, not the same object
    recent.put(b"c", 3)
    assert recent.get(b"b") is None
    assert (recent.get(b"a"), recent.get(b"c"), len(recent)) == (1, 3, 2)
