"""The HTTPS admission server (kopf's, guarded) and the plain-HTTP probe and metrics server.

kopf's :class:`kopf.WebhookServer` serves admission; the guard in front of kopf's admission function
refuses malformed envelopes with a 400 that says what is wrong (kopf would answer some of them with
a 500), counts and times every request, and tells readiness. A handler that has its JSON patch
ready hands it to the guard (:func:`offer_patch`), which puts it in the response as it is: kopf
would otherwise copy the object, apply the patch and diff the two again (half of the request's
time). ``/healthz``, ``/readyz`` and
``/metrics`` are served beside it over plain HTTP on their own port, as kubelet's probes and
Prometheus expect: kopf's own liveness endpoint offers no readiness or metrics.
"""

import asyncio
import base64
import contextvars
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import aiohttp.web
import kopf
import prometheus_client

from gpushare.webhook.metrics import WebhookMetrics

API_VERSIONS: Final = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
OPERATIONS: Final = ("CREATE", "UPDATE", "DELETE", "CONNECT")

Resource = tuple[str, str, str]
"""An API resource as the AdmissionReview names it: group, version, plural."""


class _Reply:
    """What a handler adds to the response of the request being served."""

    def __init__(self) -> None:
        self.patch: list[dict[str, Any]] = []


_reply: contextvars.ContextVar[_Reply] = contextvars.ContextVar("gpushare_webhook_reply")


def offer_patch(ops: list[dict[str, Any]]) -> bool:
    """Hand a JSON patch to the guard serving this request; ``False`` when none serves it."""
    reply = _reply.get(None)
    if reply is None:
        return False
    reply.patch = ops
    return True


class AdmissionServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server with an envelope guard, metrics and a readiness flag.

    ``routes`` maps each served path (a kopf handler id) to the resource it admits.
    """

    def __init__(
        self, *, routes: Mapping[str, Resource], metrics: WebhookMetrics, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.routes = dict(routes)
        self.metrics = metrics
        self.listening = asyncio.Event()

    def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        """Serve ``fn`` behind the guard; yield kopf's client configs while listening."""
        return self._serve_guarded(fn)

    async def _serve_guarded(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        try:
            async for client_config in super().__call__(self._guard(fn)):
                self.listening.set()
                yield client_config
        finally:
            self.listening.clear()

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: aiohttp.web.Request) -> aiohttp.web.Response:
        """kopf's request handling, with bodies it cannot decode answered 400 rather than 500."""
        try:
            response: aiohttp.web.Response = await kopf.WebhookServer._serve(fn, request)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise aiohttp.web.HTTPBadRequest(text=f"unreadable body: {type(exc).__name__}") from exc
        return response

    def _guard(self, fn: kopf.WebhookFn) -> Callable[..., Any]:
        async def guarded(
            request: Any,
            *,
            webhook: str | None = None,
            headers: dict[str, str] | None = None,
            sslpeer: dict[str, Any] | None = None,
        ) -> Any:
            started = time.perf_counter()
            path = webhook or ""
            if path not in self.routes:
                served = self._paths()
                raise aiohttp.web.HTTPNotFound(text=f"no webhook at /{path}; served: {served}")
            problem = envelope_problem(request, self.routes[path])
            if problem is not None:
                self.metrics.requests.labels(path, "", "malformed").inc()
                raise aiohttp.web.HTTPBadRequest(text=f"malformed AdmissionReview: {problem}")
            reply = _Reply()
            token = _reply.set(reply)
            try:
                response = await fn(request, webhook=webhook, headers=headers, sslpeer=sslpeer)
            finally:
                _reply.reset(token)
            answer = response["response"]
            if reply.patch and answer.get("allowed") and not answer.get("patch"):
                answer["patch"] = base64.b64encode(json.dumps(reply.patch).encode()).decode()
                answer["patchType"] = "JSONPatch"
            outcome = (
                "denied"
                if not answer.get("allowed")
                else "mutated"
                if answer.get("patch")
                else "allowed"
            )
            self.metrics.requests.labels(path, request["request"]["operation"], outcome).inc()
            self.metrics.duration.labels(path).observe(time.perf_counter() - started)
            return response

        return guarded

    def _paths(self) -> str:
        return ", ".join(f"/{path}" for path in sorted(self.routes))


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


def probes(*, metrics: WebhookMetrics, ready: Callable[[], bool]) -> aiohttp.web.Application:
    """``/healthz`` (the loop answers), ``/readyz`` (admission is being served), ``/metrics``."""

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok\n")

    async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if ready():
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text="admission server not listening yet\n")

    async def exposition(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            body=metrics.exposition(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    app = aiohttp.web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", exposition)
    return app
