"""The simulated fleet: a catalogue of GPU models and the ``--nodes`` spec that names a fleet.

A spec is a comma-separated list of ``<nodes>x<cards>x<model>`` groups, e.g.
``4x8xH100-80GB,2x4xL4-24GB``. Each card carries the memory NVML reports for that model: the total
and the part the driver reserves (CUDA, and so vLLM, sees ``total - reserved``).
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from gpushare.core import errors
from gpushare.core.ids import CardUUID, NodeName
from gpushare.core.quantities import MI, format_bytes


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One GPU model as NVML describes it."""

    name: str
    """The catalogue key, as written in ``--nodes`` (``H100-80GB``)."""
    product: str
    """NVML's product name (``nvmlDeviceGetName``)."""
    total_bytes: int
    """NVML's total memory."""
    reserved_bytes: int
    """The driver's reserved part (NVML v2 memory info)."""

    @property
    def cuda_total_bytes(self) -> int:
        """The total CUDA (and vLLM) sees."""
        return self.total_bytes - self.reserved_bytes


def _model(name: str, product: str, total_mib: int, reserved_mib: int) -> GpuModel:
    return GpuModel(name, product, total_mib * MI, reserved_mib * MI)


CATALOGUE: Final[dict[str, GpuModel]] = {
    model.name.lower(): model
    for model in (
        # Measured: NVML total 81,559 MiB, torch total 79.18 GiB (81,080 MiB).
        _model("H100-80GB", "NVIDIA H100 80GB HBM3", 81_559, 479),
        # The others: nvidia-smi totals as published for each board; the reserved part scaled from
        # the H100's (about 0.6 % of the card, never under 256 MiB) until measured.
        _model("H100-94GB", "NVIDIA H100 NVL", 95_830, 563),
        _model("H200-141GB", "NVIDIA H200", 143_771, 845),
        _model("B200-180GB", "NVIDIA B200", 183_359, 1_077),
        _model("A100-80GB", "NVIDIA A100-SXM4-80GB", 81_920, 481),
        _model("A100-40GB", "NVIDIA A100-SXM4-40GB", 40_960, 256),
        _model("L40S-48GB", "NVIDIA L40S", 46_068, 271),
        _model("L40-48GB", "NVIDIA L40", 46_068, 271),
        _model("A6000-48GB", "NVIDIA RTX A6000", 49_140, 289),
        _model("L4-24GB", "NVIDIA L4", 23_034, 256),
        _model("A10-24GB", "NVIDIA A10", 23_028, 256),
        _model("A10G-24GB", "NVIDIA A10G", 23_028, 256),
        _model("T4-16GB", "Tesla T4", 15_360, 256),
    )
}
"""Known GPU models by lower-case name."""

DEFAULT_SPEC: Final = "4x8xH100-80GB"
MAX_NODES: Final = 64
"""Each node runs its own device-plugin process (~60 MB each): 64 keep a laptop comfortable."""
MAX_CARDS_PER_NODE: Final = 16

_GROUP: Final = re.compile(r"^(?P<nodes>\d+)\s*[xX]\s*(?P<cards>\d+)\s*[xX]\s*(?P<model>\S+)$")


@dataclass(frozen=True, slots=True)
class Card:
    """One simulated card."""

    node: NodeName
    index: int
    uuid: CardUUID
    model: GpuModel


@dataclass(frozen=True, slots=True)
class Node:
    """One simulated GPU node."""

    name: NodeName
    cards: tuple[Card, ...]


@dataclass(frozen=True, slots=True)
class Fleet:
    """Every node of the simulation, in spec order."""

    spec: str
    nodes: tuple[Node, ...]

    @property
    def cards(self) -> tuple[Card, ...]:
        return tuple(card for node in self.nodes for card in node.cards)

    @property
    def largest_card_bytes(self) -> int:
        return max(card.model.cuda_total_bytes for card in self.cards)


def lookup(name: str) -> GpuModel:
    """The catalogue entry for ``name`` (case-insensitive), or a ConfigError listing the known."""
    model = CATALOGUE.get(name.strip().lower())
    if model is None:
        known = ", ".join(model.name for model in CATALOGUE.values())
        raise errors.ConfigError(f"unknown GPU model {name!r}; known models: {known}")
    return model


def card_uuid(node: str, index: int) -> CardUUID:
    """A stable, NVML-shaped UUID for a simulated card."""
    digest = hashlib.sha256(f"{node}/{index}".encode()).hexdigest()
    return CardUUID(
        f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    )


def parse(spec: str) -> Fleet:
    """Parse ``4x8xH100-80GB,2x4xL4-24GB`` into nodes named ``<model>-<n>`` (``h100-80gb-0``)."""
    groups = [group.strip() for group in spec.split(",") if group.strip()]
    if not groups:
        raise errors.ConfigError(f"--nodes {spec!r} names no nodes; write e.g. {DEFAULT_SPEC!r}")
    nodes: list[Node] = []
    seen: dict[str, int] = {}
    for group in groups:
        match = _GROUP.match(group)
        if match is None:
            raise errors.ConfigError(
                f"--nodes group {group!r} is not <nodes>x<cards>x<model>;"
                f" write e.g. {DEFAULT_SPEC!r}"
            )
        count, cards = int(match["nodes"]), int(match["cards"])
        model = lookup(match["model"])
        if count < 1 or not 1 <= cards <= MAX_CARDS_PER_NODE:
            raise errors.ConfigError(
                f"--nodes group {group!r}: need at least one node and 1 to {MAX_CARDS_PER_NODE}"
                " cards per node"
            )
        for _ in range(count):
            number = seen.get(model.name, 0)
            seen[model.name] = number + 1
            name = NodeName(f"{model.name.lower()}-{number}")
            nodes.append(
                Node(name, tuple(Card(name, i, card_uuid(name, i), model) for i in range(cards)))
            )
    if len(nodes) > MAX_NODES:
        raise errors.ConfigError(
            f"--nodes {spec!r} has {len(nodes)} nodes; the simulation runs at most {MAX_NODES}"
        )
    return Fleet(spec, tuple(nodes))


def describe(fleet: Fleet) -> str:
    """``4 nodes x 8 H100-80GB (79.2 GiB usable each)`` per group, for the report's header."""
    counts: dict[tuple[str, int], int] = {}
    for node in fleet.nodes:
        key = (node.cards[0].model.name, len(node.cards))
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(
        f"{n} node{'s' if n > 1 else ''} x {cards} {name}"
        f" ({format_bytes(lookup(name).cuda_total_bytes)} usable each)"
        for (name, cards), n in counts.items()
    )
