"""The report picture: one bar per card, stacked by InferenceService, capacity and reserve marked.

Each service's segment is its grant; its lower, hatched part is the per-instance reserve (the CUDA
context, outside vLLM's budget); a thin grey slice is the MPS server each allocation runs. A red
tick marks what the card's processes use (NVML); the dark cap above the usable (black) line is the
part the driver reserves, up to NVML's total.
"""

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gpushare.core import errors
from gpushare.core.quantities import GI
from gpushare.simulator.outcome import CardState, Outcome, Placement

MAX_BARS: Final = 160
"""Beyond this many used cards the bars get too thin to read: idle cards are left out first."""
LABEL_MIN_GIB: Final = 12.0
"""Segments shorter than this carry no name (a name takes about 12 GiB of an 80 GiB bar)."""


def draw(outcome: Outcome, path: Path) -> None:
    """Write the PNG to ``path``; an unwritable path is a BadRequest."""
    cards = _shown(outcome.cards)
    by_card: dict[tuple[str, int], list[Placement]] = {}
    for placement in outcome.placements:
        by_card.setdefault((placement.node, placement.card_index), []).append(placement)
    colours = itertools.cycle(plt.get_cmap("tab20")(range(20)))
    colour_of: dict[str, object] = {}

    width = min(40.0, max(8.0, 0.38 * len(cards) + 2))
    fig, ax = plt.subplots(figsize=(width, 6.5), dpi=110)
    for x, card in enumerate(cards):
        bottom = 0.0
        for placement in sorted(by_card.get((card.node, card.index), []), key=lambda p: p.pod):
            colour = colour_of.setdefault(placement.service, next(colours))
            grant = placement.granted_bytes / GI
            reserve = min(outcome.reserve_bytes, placement.granted_bytes) / GI
            ax.bar(x, reserve, bottom=bottom, color=colour, edgecolor="white", linewidth=0.4,
                   hatch="///", alpha=0.55)
            ax.bar(x, grant - reserve, bottom=bottom + reserve, color=colour, edgecolor="white",
                   linewidth=0.4)
            if grant >= LABEL_MIN_GIB:
                name = placement.service.split("/", 1)[-1]
                ax.text(x, bottom + grant / 2, f"{name} {grant:.0f}G", rotation=90,
                        ha="center", va="center", fontsize=6, clip_on=True)
            bottom += grant
            if outcome.overhead_bytes:
                ax.bar(x, outcome.overhead_bytes / GI, bottom=bottom, color="0.55", linewidth=0)
                bottom += outcome.overhead_bytes / GI
        capacity = card.capacity_bytes / GI
        ax.hlines(capacity, x - 0.45, x + 0.45, colors="black", linewidth=1.2)
        ax.bar(x, card.reserved_bytes / GI, bottom=capacity, color="0.2", width=0.9)
        if card.used_bytes:
            ax.hlines(card.used_bytes / GI, x - 0.3, x + 0.3, colors="red", linewidth=1.6)
    ax.set_xticks(range(len(cards)))
    ax.set_xticklabels([f"{c.node}/{c.index}" for c in cards], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(cards) - 0.4)
    ax.set_ylabel("GiB")
    hidden = len(outcome.cards) - len(cards)
    optimum = outcome.optimum.cards_used if outcome.optimum is not None else None
    ax.set_title(
        f"{outcome.fleet_description}\npolicy {outcome.policy}: {len(outcome.placements)}"
        f" InferenceServices on {outcome.cards_used} GPUs (one model per GPU:"
        f" {outcome.baseline}" + (f", offline optimum: {optimum}" if optimum is not None else "")
        + ")" + (f"; {hidden} idle cards not drawn" if hidden else ""),
        fontsize=9,
    )
    ax.legend(
        handles=[
            Patch(facecolor="0.8", hatch="///", label="per-instance reserve (CUDA context)"),
            Patch(facecolor="0.55", label="MPS server"),
            Patch(facecolor="0.2", label="driver-reserved, up to NVML's total"),
            Line2D([], [], color="black", label="usable (CUDA) total"),
            Line2D([], [], color="red", label="in use (NVML)"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=7, frameon=False,
    )
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", bbox_inches="tight")
    except OSError as exc:
        raise errors.BadRequest(
            f"--report {path}: cannot write the picture: {exc.strerror}"
        ) from exc
    finally:
        plt.close(fig)


def _shown(cards: Sequence[CardState]) -> list[CardState]:
    """Every card, or when too many, the used ones and as many idle as fit."""
    if len(cards) <= MAX_BARS:
        return list(cards)
    used = [card for card in cards if card.services]
    idle = [card for card in cards if not card.services]
    return used[:MAX_BARS] + idle[: max(0, MAX_BARS - len(used))]
