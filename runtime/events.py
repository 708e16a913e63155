"""The one Event format of every part: ``events.k8s.io/v1``, named as client-go names events (the
object's name and the time in hex), shown by ``kubectl describe`` and ``kubectl events``."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

MAX_NOTE: Final = 1024
"""The API's limit on an Event's note, in bytes (ASCII notes: characters)."""


def event(
    *,
    regarding: Mapping[str, str],
    reason: str,
    note: str,
    action: str,
    controller: str,
    instance: str,
    kind: Literal["Normal", "Warning"] = "Normal",
    moment: datetime | None = None,
) -> dict[str, Any]:
    """The body of an Event about ``regarding`` (``apiVersion``, ``kind``, ``namespace``,
    ``name``, ``uid``) from ``controller`` (its ``instance``: a node or a pod)."""
    when = (moment or datetime.now(UTC)).astimezone(UTC)
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {
            "name": f"{regarding['name'][:200]}.{round(when.timestamp() * 1e9):x}",
            "namespace": regarding["namespace"],
        },
        "eventTime": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "reportingController": controller,
        "reportingInstance": instance,
        "action": action[:128],
        "reason": reason[:128],
        "type": kind,
        "note": note[:MAX_NOTE],
        "regarding": dict(regarding),
    }


def pod_reference(namespace: str, name: str, uid: str) -> dict[str, str]:
    """What an Event's ``regarding`` says of a pod."""
    return {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name, "uid": uid}
