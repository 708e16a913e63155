"""What a simulation found: every card's occupants, the failures with their reasons, the figures.

Figures: cards used (holding at least one running InferenceService) against the one-model-per-GPU
baseline (one whole card per admitted InferenceService) and against the offline optimum, in cards
and in cost (each card weighs its model's configured cost, its usable memory in GiB by default,
so that fewer cards cannot hide more expensive ones); the ratio to the optimum only when both
place the same services; memory
granted and in use; stranded memory, the free room on cards too small for the smallest request
still waiting (or, when nothing waits, the smallest request of the trace).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gpushare.core.ids import CardUUID

if TYPE_CHECKING:
    from gpushare.simulator.optimum import Packing

Stage = Literal["admission", "mutation", "scheduling", "binding", "allocation", "start"]


@dataclass(frozen=True, slots=True)
class Placement:
    """An InferenceService that runs, and where."""

    service: str
    """``namespace/name``."""
    label: str
    pod: str
    node: str
    card_uuid: str
    card_index: int
    requested_bytes: int
    """The annotation."""
    granted_bytes: int
    """Whole units, as the device plugin granted them."""
    utilization: str
    """The ``--gpu-memory-utilization`` vLLM ran with."""
    used_bytes: int
    """What the running vLLM holds on the card (NVML)."""
    chosen_card: str = ""
    """The card the extender's Binding named; the device IDs (``card_uuid``) are the truth."""

    @property
    def steered(self) -> bool:
        """Whether the device plugin steered kubelet's IDs onto the extender's card."""
        return self.chosen_card == self.card_uuid


@dataclass(frozen=True, slots=True)
class Failure:
    """An InferenceService that does not run, the step that stopped it, and the reason given."""

    service: str
    label: str
    requested_bytes: int | None
    stage: Stage
    reason: str


@dataclass(frozen=True, slots=True)
class CardState:
    """One card at the end of the run."""

    node: str
    index: int
    uuid: CardUUID
    model: str
    total_bytes: int
    """NVML total."""
    reserved_bytes: int
    """The driver's reserved part."""
    capacity_bytes: int
    """CUDA-visible total: what grants may use."""
    granted_bytes: int
    """Sum of grants and per-allocation overheads (MPS servers) on this card."""
    used_bytes: int
    """NVML used (processes and MPS servers)."""
    overhead_bytes: int
    """Per-allocation overheads included in ``granted_bytes``."""
    services: tuple[str, ...]
    cost: float = 0.0
    """What using this card weighs (``card_costs`` of the configuration; memory in GiB)."""

    @property
    def room_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.granted_bytes)


@dataclass(frozen=True, slots=True)
class Round:
    """One round of churn: departures, arrivals, and the fleet after them."""

    number: int
    departed: int
    arrived: int
    placed: int
    """Arrivals and waiting pods placed in this round."""
    failed: int
    """Services not running after the round (waiting, refused or crashed)."""
    running: int
    cards_used: int
    stranded_bytes: int


RolloutLanding = Literal["same-card", "card-in-use", "empty-card", "stuck"]


@dataclass(frozen=True, slots=True)
class Rollout:
    """One rolling update (surge of one): where the new pod landed while the old one ran."""

    service: str
    requested_bytes: int
    landed: RolloutLanding
    """``stuck``: no card had room for the second copy, so the rollout waits."""
    cards_at_peak: int
    """Cards used while both copies ran (or, when stuck, before)."""
    cards_after: int
    """Cards used once the old copy went."""
    reason: str
    """Why the new pod found no card, when stuck."""


@dataclass(slots=True)
class Outcome:
    """The whole run."""

    fleet: str
    fleet_description: str
    policy: str
    isolation: str
    seed: int
    services: int
    """InferenceServices submitted, churn arrivals included."""
    control_plane: str = ""
    backend: str = "extender"
    """Who placed the pods: the extender, or kube-scheduler's DRA allocator (``dra``)."""
    backends: dict[str, dict[str, int]] = field(default_factory=dict)
    """With ``--backend dra``: each backend's cards used and services placed on the same trace."""
    """Which API server and scheduler produced the figures."""
    placements: list[Placement] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    cards: list[CardState] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    optimum: "Packing | None" = None
    seconds: float = 0.0
    api_requests: dict[str, int] = field(default_factory=dict)
    """Requests each part made of the API server (``PATCH nodes``: 12)."""
    extender_requests: dict[str, int] = field(default_factory=dict)
    """Extender calls by verb, as its own metrics count them."""
    overhead_bytes: int = 0
    """Card memory each allocation takes beyond its grant (an MPS server)."""
    reserve_bytes: int = 0
    """Per-instance memory inside each grant but outside vLLM's budget (its CUDA context)."""

    @property
    def cards_used(self) -> int:
        return sum(1 for card in self.cards if card.services)

    @property
    def cost_used(self) -> float:
        """Summed cost of the cards used."""
        return sum(card.cost for card in self.cards if card.services)

    @property
    def comparable(self) -> bool:
        """Whether the optimum placed as many services as run here (else no ratio is fair)."""
        return self.optimum is not None and self.optimum.placed == len(self.placements)

    @property
    def baseline(self) -> int:
        """One whole card per InferenceService that passed admission and now runs or waits."""
        waiting = sum(1 for f in self.failures if f.stage not in ("admission", "mutation"))
        return len(self.placements) + waiting

    @property
    def granted_bytes(self) -> int:
        return sum(p.granted_bytes for p in self.placements)

    @property
    def used_bytes(self) -> int:
        return sum(p.used_bytes for p in self.placements)

    @property
    def capacity_bytes(self) -> int:
        return sum(card.capacity_bytes for card in self.cards)

    @property
    def smallest_waiting_bytes(self) -> int | None:
        """The smallest request still waiting, else the smallest request of the run."""
        waiting = [
            f.requested_bytes
            for f in self.failures
            if f.requested_bytes and f.stage not in ("admission", "mutation")
        ]
        if waiting:
            return min(waiting)
        placed = [p.requested_bytes for p in self.placements]
        return min(placed, default=None)

    @property
    def stranded_bytes(self) -> int:
        smallest = self.smallest_waiting_bytes
        return stranded(self.cards, None if smallest is None else smallest + self.overhead_bytes)

    @property
    def ratio(self) -> float | None:
        """Cost of the cards used online over the optimum's, when both place the same services."""
        if self.optimum is None or not self.optimum.cost or not self.comparable:
            return None
        return self.cost_used / self.optimum.cost

    @property
    def card_ratio(self) -> float | None:
        """Cards used online over the optimum's, when both place the same services."""
        if self.optimum is None or not self.optimum.cards_used or not self.comparable:
            return None
        return self.cards_used / self.optimum.cards_used

    @property
    def comparison(self) -> str:
        """Why there is no ratio, or the empty string when there is one."""
        if self.optimum is None or self.optimum.cards_used is None:
            return "no optimum found"
        if not self.comparable:
            return (
                f"not comparable: {len(self.placements)} services run here, the optimum places"
                f" {self.optimum.placed}"
            )
        return ""

    def to_json(self) -> dict[str, Any]:
        """Everything, as plain JSON types."""
        optimum = None
        if self.optimum is not None:
            optimum = {
                "status": self.optimum.status,
                "cards_used": self.optimum.cards_used,
                "cards_lower_bound": self.optimum.cards_bound,
                "cost": None if self.optimum.cost is None else round(self.optimum.cost, 3),
                "cost_lower_bound": round(self.optimum.cost_bound, 3),
                "placed": self.optimum.placed,
                "seconds": round(self.optimum.seconds, 3),
            }
        return {
            "fleet": self.fleet,
            "policy": self.policy,
            "isolation": self.isolation,
            "seed": self.seed,
            "control_plane": self.control_plane,
            "backend": self.backend,
            **({"backends": self.backends} if self.backends else {}),
            "seconds": round(self.seconds, 3),
            "summary": {
                "services": self.services,
                "running": len(self.placements),
                "failed": len(self.failures),
                "cards": len(self.cards),
                "cards_used": self.cards_used,
                "baseline_cards": self.baseline,
                "optimum": optimum,
                "cost_used": round(self.cost_used, 3),
                "ratio_to_optimum": None if self.ratio is None else round(self.ratio, 4),
                "card_ratio_to_optimum": (
                    None if self.card_ratio is None else round(self.card_ratio, 4)
                ),
                "comparison": self.comparison or "same services placed",
                "capacity_bytes": self.capacity_bytes,
                "granted_bytes": self.granted_bytes,
                "used_bytes": self.used_bytes,
                "stranded_bytes": self.stranded_bytes,
                "on_extenders_card": sum(p.steered for p in self.placements),
                "smallest_waiting_bytes": self.smallest_waiting_bytes,
                "rollouts": len(self.rollouts),
                "rollouts_stuck": sum(r.landed == "stuck" for r in self.rollouts),
                "rollouts_on_empty_cards": sum(r.landed == "empty-card" for r in self.rollouts),
            },
            "cards": [asdict(card) for card in self.cards],
            "placements": [asdict(p) for p in self.placements],
            "failures": [asdict(f) for f in self.failures],
            "rounds": [asdict(r) for r in self.rounds],
            "rollouts": [asdict(r) for r in self.rollouts],
            "api_requests": dict(sorted(self.api_requests.items())),
            "extender_requests": dict(sorted(self.extender_requests.items())),
        }


def stranded(cards: Sequence[CardState], smallest: int | None) -> int:
    """Free room on cards that cannot take an allocation of ``smallest`` bytes (with overhead)."""
    if smallest is None:
        return 0
    return sum(card.room_bytes for card in cards if 0 < card.room_bytes < smallest)
