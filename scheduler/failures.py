"""Why a node cannot take a pod: a stable reason for metrics, and a line a person understands."""

import enum
from dataclasses import dataclass

__all__ = ["Failure", "Reason"]


class Reason(enum.StrEnum):
    """Why a node cannot take a pod; the stable label of the filter-failure metric."""

    UNKNOWN_NODE = "unknown-node"
    NO_REPORT = "no-report"
    BAD_REPORT = "bad-report"
    STALE = "stale-heartbeat"
    UNHEALTHY = "unhealthy"
    NO_ROOM = "no-room"
    TOO_LARGE = "too-large"
    BAD_REQUEST = "bad-request"


@dataclass(frozen=True, slots=True)
class Failure:
    """A node that cannot take a pod, with a line a person understands."""

    reason: Reason
    message: str
