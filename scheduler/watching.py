"""List and watch Nodes and Pods into the ledger.

Each resource is listed (in pages), then watched from the list's resource version with bookmarks.
A watch that ends is resumed from the last version seen; ``410 Gone`` (the version is too old) means
list again, which replaces the ledger's view wholesale (:meth:`Ledger.resync`); any other failure
waits with exponential backoff and tries again. The ledger is rebuilt from the pods' allocation
annotations, so a restarted extender knows every grant before it answers its first call.

Pods are watched without the terminal ones (``status.phase`` neither Succeeded nor Failed): a pod
that finishes leaves the watch as ``DELETED`` and gives its memory back, as a deleted pod does.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gpushare.core import config, errors, names, nodereport
from gpushare.core.ids import NodeName, PodKey
from gpushare.runtime import reflector
from gpushare.runtime.errors import ApiError
from gpushare.scheduler import annotations, demand, ledger, wire
from gpushare.scheduler.kube import Kube
from gpushare.scheduler.metrics import Metrics

__all__ = ["Watcher"]

logger = logging.getLogger(__name__)

PAGE_SIZE: Final = 500
"""Objects per list page: the apiserver's own recommendation for large lists."""

_ACTIVE_PODS: Final = "status.phase!=Succeeded,status.phase!=Failed"


@dataclass
class _Resource:
    name: str
    path: str
    params: Mapping[str, str]
    replace: Callable[[list[dict[str, Any]], float], None]
    apply: Callable[[str, dict[str, Any]], object]
    synced: bool = field(default=False)


class Watcher:
    """Keeps the ledger in step with the cluster's Nodes and Pods."""

    def __init__(
        self,
        *,
        kube: Kube,
        book: ledger.Ledger,
        settings: config.Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        watch_seconds: int = reflector.WATCH_SECONDS,
        backoff: tuple[float, float] = reflector.BACKOFF,
    ) -> None:
        self._kube = kube
        self._book = book
        self._unit_bytes = settings.unit_bytes
        self._metrics = metrics
        self._clock = clock
        self._watch_seconds = watch_seconds
        self._backoff = backoff
        self._warned: dict[str, str] = {}
        self._resources = (
            _Resource("nodes", "/api/v1/nodes", {}, self._replace_nodes, self._apply_node),
            _Resource(
                "pods",
                "/api/v1/pods",
                {"fieldSelector": _ACTIVE_PODS},
                self._replace_pods,
                self._apply_pod,
            ),
        )
        self._synced = asyncio.Event()

    @property
    def synced(self) -> bool:
        """Whether Nodes and Pods have both been listed once."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    async def run(self) -> None:
        """Watch forever (until cancelled)."""
        async with asyncio.TaskGroup() as group:
            for resource in self._resources:
                loop = self._reflector(resource)
                group.create_task(loop.run(), name=f"watch {resource.name}")

    def _reflector(self, resource: _Resource) -> reflector.Reflector:
        async def list_() -> str:
            return await self._list(resource)

        async def watch(version: str, seconds: int) -> str:
            return await self._watch(resource, version, seconds)

        def restarted(reason: str) -> None:
            self._metrics.watch_restarts.labels(resource.name, reason).inc()

        return reflector.Reflector(
            resource.name,
            list_,
            watch,
            restarted=restarted,
            seconds=self._watch_seconds,
            backoff=self._backoff,
        )

    # --- list and watch ----------------------------------------------------------------------

    async def _list(self, resource: _Resource) -> str:
        started = self._clock()
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            params: dict[str, str | int] = {**resource.params, "limit": PAGE_SIZE}
            if cont:
                params["continue"] = cont
            page = await self._kube.request("GET", resource.path, params=params, timeout=120)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        resource.replace(items, started)
        resource.synced = True
        if all(r.synced for r in self._resources):
            self._synced.set()
        logger.info("%s: listed %d", resource.name, len(items))
        return str(meta.get("resourceVersion") or "")

    async def _watch(self, resource: _Resource, version: str, seconds: int) -> str:
        params = {**resource.params, "resourceVersion": version, "allowWatchBookmarks": "true"}
        async for event in self._kube.watch(resource.path, params, timeout_seconds=seconds):
            kind = event.get("type")
            obj = event.get("object")
            if not isinstance(obj, dict):
                continue
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise reflector.Expired
                raise ApiError.from_status(int(obj.get("code") or 500), obj)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                try:
                    resource.apply(kind, obj)
                except Exception:
                    logger.exception("%s: cannot apply a %s event", resource.name, kind)
            meta = obj.get("metadata")
            if isinstance(meta, dict) and meta.get("resourceVersion"):
                version = str(meta["resourceVersion"])
        return version

    # --- nodes -------------------------------------------------------------------------------

    def _replace_nodes(self, items: list[dict[str, Any]], listed_at: float) -> None:
        listed = set()
        for item in items:
            name = self._apply_node("ADDED", item)
            if name is not None:
                listed.add(name)
        for name in self._book.node_names():
            if name not in listed:
                self._book.remove_node(name)

    def _apply_node(self, kind: str, obj: dict[str, Any]) -> NodeName | None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            return None
        node = NodeName(name)
        if kind == "DELETED":
            self._book.remove_node(node)
            self._warned.pop(f"node/{name}", None)
            return node
        text = (meta.get("annotations") or {}).get(names.ANNOTATION_NODE_REPORT)
        if text is None:
            self._book.set_node(node, None)
            return node
        try:
            report = nodereport.decode(text)
        except errors.BadRequest as exc:
            self._warn_once(f"node/{name}", f"node {name}: {exc}")
            problem = ledger.Failure(ledger.Reason.BAD_REPORT, str(exc))
            self._book.set_node(node, None, problem=problem)
            return node
        self._warned.pop(f"node/{name}", None)
        self._book.set_node(node, report)
        return node

    # --- pods --------------------------------------------------------------------------------

    def _replace_pods(self, items: list[dict[str, Any]], listed_at: float) -> None:
        listed: dict[str, tuple[PodKey, NodeName, tuple[ledger.Allocation, ...]]] = {}
        priorities: dict[str, int] = {}
        revisions: dict[str, demand.Revision] = {}
        pending: list[str] = []
        for item in items:
            found = self._read_pod(item)
            if isinstance(found, demand.PodRequest):
                pending.append(found.uid)
            elif found is not None:
                request, node, allocations = found
                listed[request.uid] = (request.key, node, allocations)
                priorities[request.uid] = request.priority
                if request.revision is not None:
                    revisions[request.uid] = request.revision
        self._book.resync(listed, listed_at=listed_at, priorities=priorities, revisions=revisions)
        self._book.forget_requests(pending, before=listed_at)

    def _apply_pod(self, kind: str, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        phase = (obj.get("status") or {}).get("phase")
        if kind == "DELETED" or phase in demand.TERMINAL_PHASES:
            if isinstance(uid, str):
                self._book.release(uid)
                self._warned.pop(f"pod/{uid}", None)
            return
        found = self._read_pod(obj)
        if found is not None and not isinstance(found, demand.PodRequest):
            request, node, allocations = found
            self._book.observe(
                request.uid,
                request.key,
                node,
                allocations,
                priority=request.priority,
                revision=request.revision,
            )

    def _read_pod(
        self, obj: dict[str, Any]
    ) -> (
        tuple[demand.PodRequest, NodeName, tuple[ledger.Allocation, ...]] | demand.PodRequest | None
    ):
        """A bound pod's request, node and allocations; a pending pod's request alone (the book
        remembers it for its bind); ``None`` for a pod that is not ours or cannot be read."""
        parsed = self._parse_pod(obj)
        if parsed is None:
            return None
        pod, request = parsed
        if not pod.spec.node_name:
            self._book.remember(request)
            return request
        allocations = self._allocations(pod, request)
        if allocations is None:
            return None
        return request, NodeName(pod.spec.node_name), allocations

    def _parse_pod(self, obj: dict[str, Any]) -> tuple[wire.Pod, demand.PodRequest] | None:
        try:
            pod = wire.Pod.model_validate(obj)
            request = demand.from_pod(
                pod, unit_bytes=self._unit_bytes, read_policy=not pod.spec.node_name
            )
        except (ValueError, errors.BadRequest) as exc:
            meta = obj.get("metadata") or {}
            key = f"pod/{meta.get('uid')}"
            self._warn_once(key, f"pod {meta.get('namespace')}/{meta.get('name')}: {exc}")
            return None
        if not request.demands or not request.uid:
            return None
        return pod, request

    def _allocations(
        self, pod: wire.Pod, request: demand.PodRequest
    ) -> tuple[ledger.Allocation, ...] | None:
        try:
            return annotations.decode(pod.metadata.annotations, request)
        except errors.BadRequest as exc:
            self._warn_once(f"pod/{request.uid}", f"pod {request.key}: {exc}")
            return None

    def _warn_once(self, key: str, message: str) -> None:
        if self._warned.get(key) != message:
            self._warned[key] = message
            logger.warning("%s", message)
