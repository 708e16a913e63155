"""A small Kubernetes API server in memory, served over HTTP, for the parts' real clients.

It speaks enough of the API for kubernetes_asyncio and kopf to run unchanged against it: discovery,
list and watch with resource versions (410 Gone past the history it keeps), label and field
selectors, create (with ``generateName``), get, replace (optimistic concurrency), the three JSON
patch flavours, delete, the ``status`` and ``binding`` subresources of pods. It stores objects as
given: no defaulting, no schema validation, no admission (the simulation drives admission itself
over the webhook's real HTTPS endpoint, as kube-apiserver does).
"""

import asyncio
import bisect
import collections
import copy
import functools
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from gpushare.simulator.apierrors import ApiError
from gpushare.simulator.patches import apply_patch
from gpushare.simulator.selectors import field_matcher, label_matcher

__all__ = ["RESOURCES", "ApiError", "ApiServer", "Resource", "Store", "resource"]

logger = logging.getLogger(__name__)

Obj = dict[str, Any]

HISTORY: Final = 50_000
"""Watch events kept for resuming watches; older resource versions get 410 Gone, as etcd's
compaction gives. A simulation of a few thousand pods stays well inside it."""

BOOKMARK_SECONDS: Final = 30.0
"""A quiet watch gets a bookmark this often (when asked for), as kube-apiserver sends them."""


@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: Final = (
    Resource("", "v1", "namespaces", "Namespace", False, ("status",), ("ns",)),
    Resource("", "v1", "nodes", "Node", False, ("status",), ("no",)),
    Resource("", "v1", "pods", "Pod", True, ("status", "binding", "eviction"), ("po",)),
    Resource("", "v1", "events", "Event", True, (), ("ev",)),
    Resource("", "v1", "configmaps", "ConfigMap", True, (), ("cm",)),
    Resource("", "v1", "secrets", "Secret", True),
    Resource("", "v1", "services", "Service", True, ("status",), ("svc",)),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, (), ("sa",)),
    Resource("events.k8s.io", "v1", "events", "Event", True, (), ("ev",)),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource("apps", "v1", "deployments", "Deployment", True, ("status", "scale"), ("deploy",)),
    Resource(
        "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", True,
        ("status",), ("isvc",),
    ),
    Resource(
        "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration", False,
    ),
    Resource(
        "admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration", False,
    ),
    Resource("kopf.dev", "v1", "kopfpeerings", "KopfPeering", True),
    Resource("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", False),
)

Key = tuple[str, str, str, str]
"""(group, plural, namespace, name); ``namespace`` is ``""`` for cluster-scoped objects."""


@dataclass(slots=True)
class _Event:
    rv: int
    type: str
    resource: Resource
    obj: Obj


@dataclass(slots=True)
class Store:
    """The objects, their resource versions and the recent changes (for watches)."""

    objects: dict[Key, Obj] = field(default_factory=dict)
    rv: int = 1
    history: list[_Event] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests served, by ``VERB resource`` (``PATCH nodes``): what the parts asked of the API."""
    closed: bool = False

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        obj = self.objects.get((res.group, res.plural, namespace if res.namespaced else "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
        return obj

    def items(self, res: Resource, namespace: str | None = None) -> list[Obj]:
        return [
            obj
            for (group, plural, ns, _), obj in self.objects.items()
            if group == res.group and plural == res.plural and (namespace in (None, ns))
        ]

    async def put(self, res: Resource, obj: Obj, *, event: str) -> Obj:
        """Store ``obj`` (stamping its resource version) and tell the watchers."""
        meta = obj.setdefault("metadata", {})
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        namespace = meta.get("namespace", "") if res.namespaced else ""
        key = (res.group, res.plural, namespace, meta["name"])
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.history.append(_Event(self.rv, event, res, copy.deepcopy(obj)))
        if len(self.history) > 2 * HISTORY:
            del self.history[:HISTORY]
        async with self.changed:
            self.changed.notify_all()
        return obj

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (res.group, res.plural, meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.setdefault("generation", 1)
        obj.setdefault("apiVersion", res.group_version)
        obj.setdefault("kind", res.kind)
        if res.plural == "pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        return await self.put(res, obj, event="ADDED")

    async def delete(self, res: Resource, namespace: str, name: str) -> Obj:
        """Delete at once; a pod first shows its ``deletionTimestamp`` (MODIFIED), as
        kube-apiserver's graceful deletion does even with a grace period of 0."""
        obj = copy.deepcopy(self.get(res, namespace, name))
        if res.plural == "pods":
            obj["metadata"] |= {"deletionTimestamp": _now(), "deletionGracePeriodSeconds": 0}
            obj = await self.put(res, obj, event="MODIFIED")
        return await self.put(res, copy.deepcopy(obj), event="DELETED")

    async def bind(self, namespace: str, name: str, binding: Obj) -> None:
        """The pods/binding subresource: set the node and the Binding's annotations at once."""
        pods = resource("", "pods")
        pod = copy.deepcopy(self.get(pods, namespace, name))
        node = (binding.get("target") or {}).get("name")
        if not node:
            raise ApiError(400, "BadRequest", "binding has no target node")
        if pod.get("spec", {}).get("nodeName"):
            raise ApiError(
                409, "Conflict",
                f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        uid = (binding.get("metadata") or {}).get("uid")
        if uid and uid != pod["metadata"].get("uid"):
            raise ApiError(409, "Conflict", f"pod {name}: the UID in the binding does not match")
        pod.setdefault("spec", {})["nodeName"] = node
        annotations = (binding.get("metadata") or {}).get("annotations") or {}
        if annotations:
            pod["metadata"].setdefault("annotations", {}).update(annotations)
        conditions = pod.setdefault("status", {}).setdefault("conditions", [])
        conditions.append({"type": "PodScheduled", "status": "True"})
        await self.put(pods, pod, event="MODIFIED")

    def newer_than(self, rv: int) -> bool:
        return self.closed or self.rv > rv

    def events_since(self, rv: int) -> list[_Event]:
        if self.history and rv < self.history[0].rv - 1:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.history[0].rv})")
        return self.history[bisect.bisect_right(self.history, rv, key=lambda e: e.rv) :]


def resource(group: str, plural: str) -> Resource:
    """The served resource ``plural`` of ``group`` (``""`` for the core group)."""
    for res in RESOURCES:
        if res.group == group and res.plural == plural:
            return res
    raise ApiError(404, "NotFound", f"the server could not find the resource {plural!r}")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")



_PATH: Final = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+)(?=/))?"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?/?$"
)


class ApiServer:
    """The store behind an aiohttp application; ``url`` once started."""

    def __init__(self) -> None:
        self.store = Store()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/readyz", self._ok)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """End open watches (as a restarting apiserver does), then stop serving."""
        self.store.closed = True
        async with self.store.changed:
            self.store.changed.notify_all()
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None

    def kubeconfig(self) -> str:
        """A kubeconfig for this server (plain HTTP on loopback, no credentials needed)."""
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "simulation", "cluster": {"server": self.url}}],
                "users": [{"name": "simulation", "user": {"token": "simulation"}}],
                "contexts": [
                    {
                        "name": "simulation",
                        "context": {"cluster": "simulation", "user": "simulation"},
                    }
                ],
                "current-context": "simulation",
            }
        )

    # --- discovery ---

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"major": "1", "minor": "36", "gitVersion": "v1.36.0-gpushare-simulation",
             "platform": "linux/amd64"}
        )

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _apis(self, request: web.Request) -> web.Response:
        groups: dict[str, list[str]] = {}
        for res in RESOURCES:
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)
        return web.json_response(
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(name, versions) for name, versions in groups.items()],
            }
        )

    def _resource_list(self, group: str, version: str) -> Obj:
        resources = []
        for res in RESOURCES:
            if res.group != group or res.version != version:
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append(
                {"name": res.plural, "singularName": res.kind.lower(), "namespaced": res.namespaced,
                 "kind": res.kind, "verbs": verbs, "shortNames": list(res.short_names)}
            )
            resources.extend(
                {"name": f"{res.plural}/{sub}", "singularName": "", "namespaced": res.namespaced,
                 "kind": res.kind, "verbs": ["get", "patch", "update", "create"]}
                for sub in res.subresources
            )
        if not resources:
            raise ApiError(404, "NotFound", f"no resources in {group}/{version}")
        group_version = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": resources}

    # --- resources ---

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)
        except json.JSONDecodeError as exc:
            error = ApiError(400, "BadRequest", f"body is not JSON: {exc}")
            return web.json_response(error.status(), status=400)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if (match := re.fullmatch(r"/apis/([^/]+)/([^/]+)/?", path)) and request.method == "GET":
            return web.json_response(self._resource_list(match[1], match[2]))
        if path.rstrip("/") == "/api/v1" and request.method == "GET":
            return web.json_response(self._resource_list("", "v1"))
        if match := re.fullmatch(r"/apis/([^/]+)/?", path):
            versions = sorted({res.version for res in RESOURCES if res.group == match[1]})
            if not versions:
                raise ApiError(404, "NotFound", f"no API group {match[1]!r}")
            return web.json_response(_group(match[1], versions) | {"kind": "APIGroup",
                                                                   "apiVersion": "v1"})
        match = _PATH.match(path)
        if match is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested path {path}")
        group = match["group"] or ""
        version = match["version"] or match["core"]
        res = resource(group, match["plural"])
        if res.version != version:
            raise ApiError(404, "NotFound", f"{res.plural} is not served at version {version}")
        namespace, name, sub = match["ns"] or "", match["name"], match["sub"]
        verb = request.method
        self.store.requests[f"{verb} {res.plural}{'/' + sub if sub else ''}"] += 1
        if name is None:
            if verb == "GET":
                if _flag(request.query.get("watch")):
                    return await self._watch(request, res, namespace or None)
                return web.json_response(self._list(request, res, namespace or None))
            if verb == "POST":
                body = await request.json()
                return web.json_response(await self.store.create(res, body, namespace), status=201)
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not allowed on a collection")
        if sub == "binding" and verb == "POST":
            await self.store.bind(namespace, name, await request.json())
            return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                      "status": "Success", "code": 201}, status=201)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served here")
        if verb == "GET":
            return web.json_response(self.store.get(res, namespace, name))
        if verb == "DELETE":
            return web.json_response(await self.store.delete(res, namespace, name))
        current = self.store.get(res, namespace, name)
        body = await request.json()
        if verb == "PATCH":
            updated = apply_patch(current, request.content_type, body)
        elif verb == "PUT":
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'the object {name} has been modified; apply your'
                               " changes to the latest version and try again")
            updated = body
        else:
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not allowed on an object")
        updated["metadata"] = {
            **(updated.get("metadata") or {}),
            **{k: current["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "name")
               if k in current["metadata"]},
        }
        return web.json_response(await self.store.put(res, updated, event="MODIFIED"))

    def _selected(self, request: web.Request) -> Callable[[Obj], bool]:
        labels = label_matcher(request.query.get("labelSelector", ""))
        fields = field_matcher(request.query.get("fieldSelector", ""))
        return lambda obj: labels(obj.get("metadata", {}).get("labels") or {}) and fields(obj)

    def _list(self, request: web.Request, res: Resource, namespace: str | None) -> Obj:
        selected = self._selected(request)
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.group_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": [obj for obj in self.store.items(res, namespace) if selected(obj)],
        }

    async def _watch(
        self, request: web.Request, res: Resource, namespace: str | None
    ) -> web.StreamResponse:
        selected = self._selected(request)
        rv_text = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds", "0") or 0)
        bookmarks = _flag(request.query.get("allowWatchBookmarks"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        def matches(event: _Event) -> bool:
            meta = event.obj.get("metadata", {})
            return (
                event.resource == res
                and (namespace is None or meta.get("namespace") == namespace)
                and selected(event.obj)
            )

        try:
            async for event in self._events(rv_text, res, namespace, timeout, bookmarks):
                if event.type == "BOOKMARK" or matches(event):
                    await response.write(
                        json.dumps({"type": event.type, "object": event.obj}).encode() + b"\n"
                    )
        except ApiError as exc:
            await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode()
                                 + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response

    async def _events(
        self, rv_text: str, res: Resource, namespace: str | None, timeout: float, bookmarks: bool
    ) -> AsyncIterator[_Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        if rv_text in ("", "0"):
            last = self.store.rv
            for obj in self.store.items(res, namespace):
                yield _Event(last, "ADDED", res, copy.deepcopy(obj))
        else:
            try:
                last = int(rv_text)
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"bad resourceVersion {rv_text!r}") from exc
        while not self.store.closed:
            for event in self.store.events_since(last):
                last = event.rv
                yield event
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            quiet = False
            async with self.store.changed:
                try:
                    await asyncio.wait_for(
                        self.store.changed.wait_for(functools.partial(self.store.newer_than, last)),
                        timeout=min(remaining or BOOKMARK_SECONDS, BOOKMARK_SECONDS),
                    )
                except TimeoutError:
                    quiet = True
            if quiet and bookmarks:
                meta = {"resourceVersion": str(last)}
                yield _Event(last, "BOOKMARK", res,
                             {"kind": res.kind, "apiVersion": res.group_version, "metadata": meta})


def _group(name: str, versions: list[str]) -> Obj:
    return {
        "name": name,
        "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in versions],
        "preferredVersion": {"groupVersion": f"{name}/{versions[0]}", "version": versions[0]},
    }


def _flag(value: str | None) -> bool:
    # Clients spell booleans "true", "True" or "1".
    return (value or "").lower() in ("true", "1")
