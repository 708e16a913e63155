"""The node report: what the agent tells the extender about every card of its node.

It travels as JSON in the Node annotation :data:`gpushare.core.names.ANNOTATION_NODE_REPORT`.
Both sides use this one model, so they agree byte for byte. ``version`` grows when a field
changes meaning; a reader rejects a report newer than it understands instead of misreading it.

Version 2 adds the node's ``isolation`` and each card's ``memory_limits`` (per-cgroup driver limits
supported); a version-1 report still reads, with ``isolation`` unknown and no card supporting them.
"""

import json
from datetime import UTC, datetime
from typing import Annotated, Final

import pydantic

from gpushare.core import errors
from gpushare.core.config import Isolation
from gpushare.core.ids import CardUUID

VERSION: Final = 2
"""The report version this code writes and the newest it reads."""

NonNegative = Annotated[int, pydantic.Field(ge=0)]


class CardReport(pydantic.BaseModel):
    """One card as NVML sees it."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    uuid: CardUUID
    index: NonNegative
    model: str
    total_bytes: NonNegative
    """NVML's total memory."""
    reserved_bytes: NonNegative = 0
    """The driver's reserved part (NVML v2 memory info); CUDA and vLLM see ``total - reserved``."""
    used_bytes: NonNegative
    free_bytes: NonNegative
    healthy: bool = True
    memory_limits: bool = False
    """The driver can hold a container to its grant by cgroup (``nvmlDeviceSetMemoryLimits_v1``)."""

    @property
    def cuda_total_bytes(self) -> int:
        """The total CUDA (and so vLLM) divides by."""
        return self.total_bytes - self.reserved_bytes


class NodeReport(pydantic.BaseModel):
    """Every card of one node, with the time the agent last spoke."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    version: int = VERSION
    heartbeat: pydantic.AwareDatetime
    """When the agent wrote the report; a time without a timezone is refused (it cannot be aged)."""
    cards: tuple[CardReport, ...]
    isolation: Isolation | None = None
    """How the node holds containers to their grants (``None``: a version-1 report)."""

    def encode(self) -> str:
        """The annotation value: compact JSON, fields in declaration order."""
        return self.model_dump_json()

    def age_seconds(self, now: datetime | None = None) -> float:
        """Seconds since the heartbeat."""
        return ((now or datetime.now(UTC)) - self.heartbeat).total_seconds()

    def same_state(self, other: "NodeReport | None") -> bool:
        """Whether ``other`` reports the same cards (heartbeat aside)."""
        return other is not None and self.cards == other.cards and self.isolation == other.isolation


def decode(text: str) -> NodeReport:
    """Parse an annotation value; a report of a newer version raises :class:`ReportVersionError`."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise errors.BadRequest(f"node report is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise errors.BadRequest("node report is not a JSON object")
    version = raw.get("version")
    if not isinstance(version, int) or version < 1:
        raise errors.BadRequest(f"node report has no valid version (got {version!r})")
    if version > VERSION:
        raise errors.ReportVersionError(
            f"node report version {version} is newer than this reader understands ({VERSION}):"
            " upgrade gpushare's scheduler and webhook before its device plugin"
        )
    try:
        return NodeReport.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise errors.BadRequest(f"node report does not parse: {_first_error(exc)}") from exc


def _first_error(exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}"
