"""The probe and metrics listener of every part: ``/healthz`` and ``/readyz`` answer 200, or 503
with the reason in the body; ``/metrics`` is a Prometheus registry in the text format."""

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp.web
import prometheus_client

Reason = Callable[[], str | None]
"""Why a probe fails now, or ``None`` when it passes."""


def _always() -> str | None:
    return None


def add_routes(
    application: aiohttp.web.Application,
    registry: prometheus_client.CollectorRegistry,
    *,
    not_ready: Reason,
    not_live: Reason = _always,
) -> aiohttp.web.Application:
    """Add ``/healthz``, ``/readyz`` and ``/metrics`` to ``application``; return it."""

    def probe(reason: Reason) -> Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.Response]]:
        async def answer(_: aiohttp.web.Request) -> aiohttp.web.Response:
            why = reason()
            if why is None:
                return aiohttp.web.Response(text="ok\n")
            return aiohttp.web.Response(status=503, text=f"{why}\n")

        return answer

    async def exposition(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            body=prometheus_client.generate_latest(registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    application.router.add_get("/healthz", probe(not_live))
    application.router.add_get("/readyz", probe(not_ready))
    application.router.add_get("/metrics", exposition)
    return application


@contextlib.asynccontextmanager
async def listening(
    application: aiohttp.web.Application, host: str | None, port: int
) -> AsyncIterator[None]:
    """Serve ``application`` on ``host:port`` (every address when ``host`` is empty) for the
    duration of the block, without an access log (probes and scrapes would fill the log)."""
    runner = aiohttp.web.AppRunner(application, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, host or None, port).start()
        yield
    finally:
        await runner.cleanup()
