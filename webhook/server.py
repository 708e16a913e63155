"""The HTTPS admission server (plain aiohttp) and the plain-HTTP probe and metrics server.

Each route serves one webhook path for one resource: the envelope is checked first (a malformed
AdmissionReview is answered 400 with what is wrong), an operation the route does not decide on
is allowed as it is (so that widening a configuration's rules can never patch an UPDATE or block
a DELETE), and the route's decision becomes the AdmissionReview response: a JSON patch, warnings,
or a refusal with its status code. A body that is not JSON is answered 400, one larger than
:data:`MAX_BODY_BYTES` 413; an unexpected error in a decision is logged with its traceback and
answered as a refusal, never as a 500 that carries a traceback. The serving pair is read again
when its files change (a renewed Secret), for the handshakes that follow.

``/healthz``, ``/readyz`` and ``/metrics`` are served beside it over plain HTTP on their own
port, as kubelet's probes and Prometheus expect.
"""

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp.web

from gpushare.core import quantities
from gpushare.webhook.metrics import WebhookMetrics

logger = logging.getLogger(__name__)

API_VERSIONS: Final = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
OPERATIONS: Final = ("CREATE", "UPDATE", "DELETE", "CONNECT")
MAX_BODY_BYTES: Final = 8 * quantities.MI
"""kube-apiserver takes request bodies up to 3 MiB (``--max-request-body-bytes``) and etcd
objects up to 1.5 MiB; an UPDATE's review carries the object and the old one: 2 × 3 MiB and the
envelope fit. aiohttp's default of 1 MiB would answer a large legal pod 413, which the
apiserver's ``failurePolicy: Fail`` turns into a refused pod."""
PAIR_CHECK_SECONDS: Final = 10.0
"""How often the serving pair's files are checked for a change: kubelet updates a mounted Secret
about a minute after it changes, so this adds little to a renewal."""
ERROR_CODE: Final = 400

Resource = tuple[str, str, str]
"""An API resource as the AdmissionReview names it: group, version, plural."""


@dataclass(frozen=True)
class Answer:
    """A route's decision on one request."""

    allowed: bool = True
    patch: Sequence[Mapping[str, Any]] = ()
    warnings: Sequence[str] = ()
    code: int = 403
    message: str = ""


Decide = Callable[[Mapping[str, Any]], Awaitable[Answer]]
"""A route's decision: the AdmissionReview's ``request`` in, an :class:`Answer` out."""


@dataclass(frozen=True)
class Route:
    """One webhook path: the resource it admits, the operations it decides on, its decision."""

    resource: Resource
    operations: frozenset[str]
    decide: Decide


class AdmissionServer:
    """Admission over HTTPS on ``host:port`` with the pair from ``cert`` and ``key``."""

    def __init__(
        self,
        *,
        routes: Mapping[str, Route],
        metrics: WebhookMetrics,
        host: str,
        port: int,
        cert: Path,
        key: Path,
    ) -> None:
        self.routes = dict(routes)
        self.metrics = metrics
        self.host = host
        self.port = port
        self.cert = cert
        self.key = key
        self.listening = asyncio.Event()
        self._runner: aiohttp.web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (an unusable pair or address raises here) and watch the pair's files."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        app = aiohttp.web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/{path}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host or None, self.port, ssl_context=context)
        await site.start()
        self._watch = asyncio.create_task(self._reload(context), name="serving pair")
        self.listening.set()

    async def stop(self) -> None:
        """Stop listening; requests in flight are answered first."""
        self.listening.clear()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._runner is not None:
            await self._runner.cleanup()

    async def _reload(self, context: ssl.SSLContext) -> None:
        seen = self._stamp()
        while True:
            await asyncio.sleep(PAIR_CHECK_SECONDS)
            stamp = self._stamp()
            if stamp == seen:
                continue
            try:
                context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:  # half-written: keep the old pair, try again
                logger.warning("serving pair not reloaded yet: %s", exc)
                continue
            seen = stamp
            logger.info("serving pair reloaded from %s", self.cert)

    def _stamp(self) -> tuple[tuple[float, int], ...]:
        stamps = []
        for path in (self.cert, self.key):
            try:
                stat = path.stat()
            except OSError:
                stamps.append((0.0, -1))
            else:
                stamps.append((stat.st_mtime, stat.st_size))
        return tuple(stamps)

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        started = time.perf_counter()
        path = request.match_info["path"]
        route = self.routes.get(path)
        if route is None:
            served = ", ".join(f"/{known}" for known in sorted(self.routes))
            raise aiohttp.web.HTTPNotFound(text=f"no webhook at /{path}; served: {served}")
        try:
            review = json.loads(await request.read())
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
            self.metrics.requests.labels(path, "", "malformed").inc()
            raise aiohttp.web.HTTPBadRequest(
                text=f"unreadable body: {type(exc).__name__}"
            ) from None
        problem = envelope_problem(review, route.resource)
        if problem is not None:
            self.metrics.requests.labels(path, "", "malformed").inc()
            raise aiohttp.web.HTTPBadRequest(text=f"malformed AdmissionReview: {problem}")
        operation = review["request"]["operation"]
        answer = await self._decide(path, route, review["request"])
        outcome = "denied" if not answer.allowed else "mutated" if answer.patch else "allowed"
        self.metrics.requests.labels(path, operation, outcome).inc()
        response = aiohttp.web.json_response(
            {
                "apiVersion": review["apiVersion"],
                "kind": "AdmissionReview",
                "response": _payload(review["request"]["uid"], answer),
            }
        )
        self.metrics.duration.labels(path).observe(time.perf_counter() - started)
        return response

    async def _decide(self, path: str, route: Route, request: Mapping[str, Any]) -> Answer:
        if request["operation"] not in route.operations:
            return Answer()
        try:
            return await route.decide(request)
        except Exception as exc:  # a bug of ours: the pod is refused, the server lives on
            logger.exception("/%s: no decision for %s", path, describe(request))
            return Answer(
                allowed=False,
                code=ERROR_CODE,
                message=f"gpushare could not read the object ({type(exc).__name__}): check its"
                " fields against the API reference",
            )


def _payload(uid: str, answer: Answer) -> dict[str, Any]:
    payload: dict[str, Any] = {"uid": uid, "allowed": answer.allowed}
    if answer.warnings:
        payload["warnings"] = list(answer.warnings)
    if not answer.allowed:
        payload["status"] = {"code": answer.code, "message": answer.message}
    elif answer.patch:
        payload["patchType"] = "JSONPatch"
        payload["patch"] = base64.b64encode(json.dumps(list(answer.patch)).encode()).decode()
    return payload


def describe(request: Mapping[str, Any]) -> str:
    """``namespace/name`` of a request's object, for logs (``generateName*`` before a name)."""
    body = request.get("object") or request.get("oldObject") or {}
    metadata = body.get("metadata") or {}
    name = metadata.get("name") or request.get("name") or f"{metadata.get('generateName') or ''}*"
    return printable(f"{request.get('namespace') or metadata.get('namespace') or '-'}/{name}")


def printable(text: str) -> str:
    """``text`` for one log line: newlines and other control characters escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def envelope_problem(review: object, resource: Resource) -> str | None:
    """What makes ``review`` unfit for an AdmissionReview request to ``resource``, if anything."""
    if not isinstance(review, dict):
        return "the body must be a JSON object"
    if review.get("apiVersion") not in API_VERSIONS or review.get("kind") != "AdmissionReview":
        return f"apiVersion must be one of {', '.join(API_VERSIONS)} and kind AdmissionReview"
    request = review.get("request")
    if not isinstance(request, dict):
        return "request must be an object"
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        return "request.uid must be a non-empty string"
    if request.get("operation") not in OPERATIONS:
        return f"request.operation must be one of {', '.join(OPERATIONS)}"
    asked = request.get("resource")
    if not isinstance(asked, dict) or not all(
        isinstance(asked.get(key), str) for key in ("group", "version", "resource")
    ):
        return "request.resource must name group, version and resource"
    if (asked["group"], asked["version"], asked["resource"]) != resource:
        group, version, plural = resource
        return f"this webhook admits {plural}.{version}.{group or 'core'}, not {asked}"
    if not isinstance(request.get("userInfo"), dict):
        return "request.userInfo must be an object"
    for key in ("subResource", "name", "namespace"):
        if request.get(key) is not None and not isinstance(request[key], str):
            return f"request.{key} must be a string"
    if request.get("dryRun") is not None and not isinstance(request["dryRun"], bool):
        return "request.dryRun must be a boolean"
    bodies = [request.get(key) for key in ("object", "oldObject")]
    if bodies[0] is None and request["operation"] in ("CREATE", "UPDATE"):
        return f"request.object is needed for {request['operation']}"
    if all(body is None for body in bodies):
        return "request.object or request.oldObject is needed"
    for key, body in zip(("object", "oldObject"), bodies, strict=True):
        if body is None:
            continue
        problem = _object_problem(body)
        if problem is not None:
            return f"request.{key}: {problem}"
    return None


def _object_problem(body: object) -> str | None:
    if not isinstance(body, dict):
        return "must be an object"
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        return "metadata must be an object"
    for key in ("name", "generateName", "namespace", "uid", "deletionTimestamp"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            return f"metadata.{key} must be a string"
    for key in ("annotations", "labels"):
        values = metadata.get(key)
        if values is None:
            continue
        if not isinstance(values, dict) or not all(
            isinstance(item, str) for pair in values.items() for item in pair
        ):
            return f"metadata.{key} must map strings to strings"
    return None
