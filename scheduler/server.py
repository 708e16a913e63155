"""The extender's routes: ``<prefix>/filter``, ``/prioritize``, ``/bind``, ``/preempt``, probes.

Routes only: each handler parses, calls :mod:`filtering`, :mod:`scoring`, :mod:`binding` or
:mod:`preemption`, and
writes the answer. A malformed call gets ``400`` with the reason as text; a well-formed call about a
pod that cannot be placed gets ``200`` with the reason in the answer, where kube-scheduler shows it
in the pod's FailedScheduling Event.
"""

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from gpushare.core import config, errors
from gpushare.runtime import probes
from gpushare.scheduler import filtering, ledger, preemption, scoring, wire
from gpushare.scheduler.binding import Binder
from gpushare.scheduler.metrics import Metrics
from gpushare.scheduler.priorities import PriorityLists

__all__ = ["MAX_BODY_BYTES", "make_app"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 256 * 1024**2
"""Without nodeCacheCapable a filter call carries whole Nodes: 5,000 of up to ~50 kB each."""

NOT_SYNCED: Final = "gpushare extender is starting: its ledger has not listed nodes and pods yet"

_JSON: Final = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    *,
    book: ledger.Ledger,
    binder: Binder,
    settings: config.Settings,
    metrics: Metrics,
    ready: Callable[[], bool],
) -> web.Application:
    """The aiohttp application of one extender."""
    memo = wire.Memo()
    answers = PriorityLists()
    stem = settings.scheduler.url_prefix.strip("/")
    prefix = f"/{stem}" if stem else ""

    def timed(verb: str, handler: Handler) -> Handler:
        histogram = metrics.request_seconds.labels(verb)

        async def wrapper(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                return await handler(request)
            except errors.BadRequest as exc:
                metrics.bad_requests.labels(verb).inc()
                logger.warning("%s: bad request from %s: %s", verb, request.remote, exc)
                return web.Response(status=400, text=f"{exc}\n")
            finally:
                histogram.observe(time.perf_counter() - started)

        return wrapper

    async def filter_nodes(request: web.Request) -> web.Response:
        args, candidates = wire.parse_args(await request.read(), memo)
        if not ready():
            return web.Response(
                body=wire.encode_filter_names(None, {}, {}, error=NOT_SYNCED),
                content_type=_JSON,
            )
        outcome = filtering.filter_nodes(book, args, candidates, settings=settings)
        for reason, count in outcome.failures.items():
            metrics.filter_failures.labels(reason.value).inc(count)
        body = outcome.encode(args)
        if args.node_names is not None and outcome.passed is not candidates:
            memo.remember(outcome.passed)  # the next prioritize call names exactly these
        return web.Response(body=body, content_type=_JSON)

    async def prioritize(request: web.Request) -> web.Response:
        args, candidates = wire.parse_args(await request.read(), memo)
        return web.Response(
            body=scoring.prioritize(book, args, candidates, settings=settings, answers=answers),
            content_type=_JSON,
        )

    async def bind(request: web.Request) -> web.Response:
        args = wire.parse(wire.ExtenderBindingArgs, await request.read())
        error = await binder.bind(args) if ready() else NOT_SYNCED
        result = wire.ExtenderBindingResult.model_construct(error=error)
        return web.Response(body=wire.encode(result), content_type=_JSON)

    async def preempt(request: web.Request) -> web.Response:
        args = preemption.parse(await request.read())
        # Not synced: no node can be vouched for, and kube-scheduler preempts nothing.
        result = _preempt(book, args, settings, metrics) if ready() else None
        return web.Response(
            body=wire.encode(result or wire.ExtenderPreemptionResult()), content_type=_JSON
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(f"{prefix}/filter", timed("filter", filter_nodes))
    app.router.add_post(f"{prefix}/prioritize", timed("prioritize", prioritize))
    app.router.add_post(f"{prefix}/bind", timed("bind", bind))
    app.router.add_post(f"{prefix}/preempt", timed("preempt", preempt))
    return probes.add_routes(
        app, metrics.registry, not_ready=lambda: None if ready() else NOT_SYNCED
    )


def _preempt(
    book: ledger.Ledger,
    args: wire.ExtenderPreemptionArgs,
    settings: config.Settings,
    metrics: Metrics,
) -> wire.ExtenderPreemptionResult:
    outcomes: Counter[str] = Counter()
    result = preemption.preempt(book, args, unit_bytes=settings.unit_bytes, outcomes=outcomes)
    for outcome, count in outcomes.items():
        metrics.preempt_nodes.labels(outcome).inc(count)
    return result
