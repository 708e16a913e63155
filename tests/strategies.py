"""Hypothesis strategies shared by every test: quantities, cards, node reports.

Strategies build valid values unless their name says otherwise; tests that need bad input say so
with their own strategies.
"""

from datetime import UTC, datetime, timedelta, timezone
from typing import get_args

from hypothesis import strategies as st

from gpushare.core import config, nodereport, placement, quantities
from gpushare.core.ids import CardUUID, NodeName

GI = quantities.GI
MI = quantities.MI

BINARY_SUFFIXES = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
DECIMAL_SUFFIXES = ("", "k", "M", "G", "T", "P", "E")

CARD_SIZES = (16 * GI, 24 * GI, 40 * GI, 48 * GI, 80 * GI, 94 * GI, 141 * GI)
"""Memory of real cards (T4/V100 16 GB, L4 24 GB, A100 40 GB, L40S 48 GB, H100 80/94 GB, H200)."""


def byte_sizes(*, max_value: int = 2 * quantities.KI**5) -> st.SearchStrategy[int]:
    """Whole byte counts up to 2 PiB, leaning to round sizes as people write them."""
    round_sizes = st.builds(
        lambda n, unit: n * unit,
        st.integers(min_value=0, max_value=4096),
        st.sampled_from((1, quantities.KI, MI, GI, 1000, 1000**2, 1000**3)),
    ).filter(lambda n: n <= max_value)
    return st.one_of(round_sizes, st.integers(min_value=0, max_value=max_value))


def _number_texts() -> st.SearchStrategy[str]:
    # Up to 12 integer digits and 6 fraction digits: well within Decimal's default precision,
    # so an oracle using the default context computes exactly too.
    integer = st.integers(min_value=0, max_value=10**12).map(str)
    fraction = st.integers(min_value=0, max_value=10**6 - 1).map(lambda f: f"{f:06d}".rstrip("0"))
    with_fraction = st.builds(lambda i, f: f"{i}.{f}" if f else i, integer, fraction)
    return st.one_of(integer, with_fraction)


def memory_quantities() -> st.SearchStrategy[str]:
    """Valid Kubernetes memory quantities: ``20Gi``, ``1.5Gi``, ``20G``, ``2e9``, ``2147483648``."""
    binary = st.builds(lambda n, s: n + s, _number_texts(), st.sampled_from(BINARY_SUFFIXES))
    decimal = st.builds(lambda n, s: n + s, _number_texts(), st.sampled_from(DECIMAL_SUFFIXES))
    exponent = st.builds(
        lambda n, e, exp: f"{n}{e}{exp}",
        _number_texts(),
        st.sampled_from("eE"),
        st.integers(min_value=0, max_value=12),
    )
    return st.one_of(binary, decimal, exponent)


def unit_sizes() -> st.SearchStrategy[int]:
    """Memory units the configuration accepts: 64 MiB up to 16 GiB."""
    return st.one_of(
        st.sampled_from((64 * MI, 128 * MI, 256 * MI, 512 * MI, GI, 2 * GI)),
        st.integers(min_value=quantities.MIN_UNIT_BYTES, max_value=16 * GI),
    )


def card_uuids() -> st.SearchStrategy[CardUUID]:
    """NVML-style card UUIDs: ``GPU-`` and a hex UUID."""
    return st.uuids().map(lambda u: CardUUID(f"GPU-{u}"))


NODES = tuple(NodeName(f"gpu-node-{i}") for i in range(4))
"""A few node names, so that generated cards share nodes."""


def node_names() -> st.SearchStrategy[NodeName]:
    """DNS-1123 node names."""
    return st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z").map(NodeName)


def heartbeats() -> st.SearchStrategy[datetime]:
    """Timezone-aware times, in UTC or a fixed offset, as an agent could write them."""
    zones = st.one_of(
        st.just(UTC),
        st.integers(min_value=-14 * 60, max_value=14 * 60).map(
            lambda m: timezone(timedelta(minutes=m))
        ),
    )
    return st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=zones
    )


@st.composite
def card_reports(draw: st.DrawFn, *, index: int | None = None) -> nodereport.CardReport:
    """One card as the agent reports it: used + free never exceed the CUDA-visible total."""
    total = draw(st.sampled_from(CARD_SIZES) | st.integers(min_value=GI, max_value=256 * GI))
    reserved = draw(st.integers(min_value=0, max_value=total // 16))
    used = draw(st.integers(min_value=0, max_value=total - reserved))
    free = draw(st.integers(min_value=0, max_value=total - reserved - used))
    return nodereport.CardReport(
        uuid=draw(card_uuids()),
        index=draw(st.integers(min_value=0, max_value=15)) if index is None else index,
        model=draw(st.text(min_size=1, max_size=40)),
        total_bytes=total,
        reserved_bytes=reserved,
        used_bytes=used,
        free_bytes=free,
        healthy=draw(st.booleans()),
        memory_limits=draw(st.booleans()),
    )


@st.composite
def node_reports(draw: st.DrawFn, *, max_cards: int = 8) -> nodereport.NodeReport:
    """A node's report with cards indexed 0..n-1."""
    count = draw(st.integers(min_value=0, max_value=max_cards))
    cards = tuple(draw(card_reports(index=i)) for i in range(count))
    isolation = draw(st.sampled_from([None, *get_args(config.Isolation)]))
    return nodereport.NodeReport(heartbeat=draw(heartbeats()), cards=cards, isolation=isolation)


@st.composite
def cards(
    draw: st.DrawFn, *, node: NodeName | None = None, index: int | None = None
) -> placement.Card:
    """A card as the ledger sees it: some of it granted, maybe foreign use, maybe unhealthy."""
    capacity = draw(st.sampled_from(CARD_SIZES) | st.integers(min_value=GI, max_value=256 * GI))
    granted = draw(st.integers(min_value=0, max_value=capacity))
    free = draw(st.none() | st.integers(min_value=0, max_value=capacity))
    node = draw(st.sampled_from(NODES)) if node is None else node
    index = draw(st.integers(min_value=0, max_value=15)) if index is None else index
    return placement.Card(
        node=node,
        uuid=CardUUID(f"GPU-{node}-{index}"),
        index=index,
        capacity_bytes=capacity,
        granted_bytes=granted,
        free_bytes=free,
        healthy=draw(st.booleans() | st.just(True)),
    )


def card_lists(*, max_size: int = 12) -> st.SearchStrategy[list[placement.Card]]:
    """Cards of a few nodes, each (node, index) once."""
    return st.lists(cards(), max_size=max_size, unique_by=lambda c: (c.node, c.index))
