"""Bind: choose the card, record it, post the Binding with the card on it, and say so in an Event.

The card is recorded in the ledger before the Binding goes out (nothing else can take that room
meanwhile) and given back if the apiserver refuses. The allocation annotations travel on the
Binding's metadata, so the apiserver writes them onto the pod in the same update that sets its
node: no pod is ever bound without its card, and no second write can fail halfway.

A ``409 Conflict`` usually means a retried bind whose first attempt landed (the extender restarted
or the answer was lost): when the pod already sits on the same node, the bind succeeded.

The Events are posted off the scheduling path, as kube-scheduler's own are: queued at bind time
and posted once no bind came for :data:`EVENT_IDLE_SECONDS`, so that a burst of pods is bound
first and described right after. Beyond a backlog of :data:`EVENT_BACKLOG` they are posted without
waiting, so under endless load every bind still gets its Event, only later.
"""

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from gpushare.core import config, errors, names
from gpushare.core.ids import NodeName, pod_key
from gpushare.core.quantities import format_bytes
from gpushare.runtime import events
from gpushare.runtime.errors import ApiError
from gpushare.scheduler import annotations, demand, ledger, wire
from gpushare.scheduler.kube import Kube
from gpushare.scheduler.metrics import Metrics

__all__ = ["Binder"]

logger = logging.getLogger(__name__)

EVENT_REASON: Final = "GPUMemoryGranted"
"""events.k8s.io/v1 refuses a note over 1 kB."""
EVENT_IDLE_SECONDS: Final = 0.02
"""Events wait until no bind came for this long (between pods of a burst binds come faster)."""
EVENT_BACKLOG: Final = 2000
"""Events queued beyond this many are posted at once, however busy the extender is."""
CLOSE_SECONDS: Final = 5.0

_WHY: Final = {
    "fill": "fill chose the card in use left fullest, else the smallest empty card that fits",
    "binpack": "binpack chose the fullest card that fits",
    "spread": "spread chose the emptiest card",
}


class Binder:
    """Binds pods for kube-scheduler, one card per memory-requesting container."""

    def __init__(
        self,
        *,
        book: ledger.Ledger,
        kube: Kube,
        settings: config.Settings,
        metrics: Metrics,
        instance: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._book = book
        self._kube = kube
        self._settings = settings
        self._metrics = metrics
        self._instance = (instance or socket.gethostname())[:128]
        self._now = now
        self._events: deque[tuple[demand.PodRequest, ledger.Grant, str, datetime]] = deque()
        self._queued = asyncio.Event()
        self._poster: asyncio.Task[None] | None = None
        self._last_bind = -float("inf")
        self.event_idle_seconds = EVENT_IDLE_SECONDS
        self.event_backlog = EVENT_BACKLOG

    async def bind(self, args: wire.ExtenderBindingArgs) -> str:
        """Bind the pod; return ``""`` on success, else the reason (kube-scheduler retries)."""
        self._last_bind = time.monotonic()
        key = pod_key(args.pod_namespace, args.pod_name)
        node = NodeName(args.node)
        request = self._book.request(args.pod_uid) if args.pod_uid else None
        if request is None:
            try:
                request = await self._read_request(args)
            except errors.BadRequest as exc:
                return self._fail("bad-request", f"pod {key}: {exc}")
            except ApiError as exc:
                return self._fail("api-error", f"cannot read pod {key}: {exc}")
        policy = request.policy or self._settings.policy
        try:
            grant = self._book.reserve(request, node, policy=policy)
        except errors.NoFit as exc:
            return self._fail("no-fit", f"node {node} cannot take pod {key}: {exc}")
        except errors.Conflict as exc:
            return self._fail("conflict", str(exc))
        moment = self._now()
        body = _binding(args, request.uid, annotations.encode(grant.allocations, bind_time=moment))
        path = f"/api/v1/namespaces/{args.pod_namespace}/pods/{args.pod_name}/binding"
        try:
            await self._kube.request("POST", path, body=body)
        except ApiError as exc:
            if not (exc.status == 409 and await self._bound_already(args, request)):
                current = self._book.grant(request.uid)
                if current is grant and grant.state == "reserved":
                    self._book.release(request.uid)
                result = "conflict" if exc.status == 409 else "api-error"
                return self._fail(result, f"binding pod {key} to node {node} failed: {exc}")
        self._book.commit(request.uid)
        self._metrics.binds.labels("bound").inc()
        self._announce(request, grant, policy, moment)
        return ""

    async def close(self) -> None:
        """Post the Events still queued (for a few seconds at most), then stop."""
        if self._poster is None:
            return
        self._last_bind = -float("inf")
        self._queued.set()
        try:
            await asyncio.wait_for(self._flushed(), CLOSE_SECONDS)
        except TimeoutError:
            logger.warning("%d Events not posted at shutdown", len(self._events))
        self._poster.cancel()
        await asyncio.gather(self._poster, return_exceptions=True)
        self._poster = None

    async def _flushed(self) -> None:
        while self._events:
            await asyncio.sleep(0.01)

    async def _read_request(self, args: wire.ExtenderBindingArgs) -> demand.PodRequest:
        raw = await self._kube.request(
            "GET", f"/api/v1/namespaces/{args.pod_namespace}/pods/{args.pod_name}"
        )
        pod = wire.Pod.model_validate(raw)
        if args.pod_uid and pod.metadata.uid != args.pod_uid:
            raise errors.BadRequest(
                f"has UID {pod.metadata.uid}, not {args.pod_uid}: it was deleted and recreated"
            )
        return demand.from_pod(pod, unit_bytes=self._settings.unit_bytes)

    async def _bound_already(
        self, args: wire.ExtenderBindingArgs, request: demand.PodRequest
    ) -> bool:
        """Whether the pod already sits on the node asked for (a retried bind that landed)."""
        try:
            raw = await self._kube.request(
                "GET", f"/api/v1/namespaces/{args.pod_namespace}/pods/{args.pod_name}"
            )
            pod = wire.Pod.model_validate(raw)
            found = annotations.decode(pod.metadata.annotations, request)
        except (ApiError, errors.BadRequest, ValueError):
            return False
        if pod.metadata.uid != request.uid or pod.spec.node_name != args.node:
            return False
        if found is not None:
            self._book.observe(request.uid, request.key, NodeName(args.node), found)
        return True

    def _fail(self, result: str, message: str) -> str:
        self._metrics.binds.labels(result).inc()
        logger.warning("bind refused: %s", message)
        return message

    def _announce(
        self,
        request: demand.PodRequest,
        grant: ledger.Grant,
        policy: str,
        moment: datetime,
    ) -> None:
        """Queue the pod's Event (written and logged when it is posted)."""
        self._events.append((request, grant, policy, moment))
        self._queued.set()
        if self._poster is None:
            self._poster = asyncio.get_running_loop().create_task(
                self._post_events(), name="gpushare events"
            )

    async def _post_events(self) -> None:
        """Post queued Events whenever binds pause (or the backlog is full), oldest first."""
        while True:
            await self._queued.wait()
            while self._events:
                quiet = time.monotonic() - self._last_bind
                if quiet < self.event_idle_seconds and len(self._events) < self.event_backlog:
                    await asyncio.sleep(min(self.event_idle_seconds - quiet, 0.5))
                    continue
                request, grant, policy, moment = self._events[0]
                try:
                    await self._post_event(request, _note(grant, policy), moment)
                except Exception:
                    logger.exception("cannot post an Event")
                self._events.popleft()
            self._queued.clear()

    async def _post_event(self, request: demand.PodRequest, note: str, moment: datetime) -> None:
        logger.info("pod %s: %s", request.key, note)
        body = events.event(
            regarding=events.pod_reference(request.namespace, request.name, request.uid),
            reason=EVENT_REASON,
            note=note,
            action="Binding",
            controller=names.SCHEDULER_CONTROLLER,
            instance=self._instance,
            moment=moment,
        )
        try:
            await self._kube.request(
                "POST", f"/apis/events.k8s.io/v1/namespaces/{request.namespace}/events", body=body
            )
        except ApiError as exc:
            logger.warning("pod %s: cannot post its Event: %s", request.key, exc)


def _note(grant: ledger.Grant, policy: str) -> str:
    """What the pod's Event says: each container's card, and why that card."""
    parts = [
        f"{format_bytes(a.granted_bytes)} for {a.container!r} on GPU {a.index} ({a.card},"
        f" {format_bytes(a.card_total_bytes)}) of node {grant.node}"
        for a in grant.allocations
    ]
    if not parts:
        return f"bound to node {grant.node} without GPU memory"
    return f"granted {'; '.join(parts)}: {_WHY.get(policy, policy)}"


def _binding(args: wire.ExtenderBindingArgs, uid: str, notes: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": args.pod_name, "namespace": args.pod_namespace}
    if uid:
        metadata["uid"] = uid  # a precondition: never bind a pod recreated under the same name
    if notes:
        metadata["annotations"] = notes
    return {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": metadata,
        "target": {"apiVersion": "v1", "kind": "Node", "name": args.node},
    }
