"""The agent's HTTP listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for kubelet.

``/healthz`` answers 200 while the agent's event loop answers and its poll loop keeps its pace; a
poll loop stuck past :data:`agent.STALL_SECONDS` answers 503 with the reason, so kubelet's liveness
probe restarts the agent (a wedged event loop answers nothing, which fails the probe too).
``/readyz`` answers once the plugin is registered with kubelet and its isolation is up (in an MPS
mode nothing is granted while the daemon or its control program is missing); until then it
answers 503 with the reason.
"""

import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp.web
import prometheus_client

from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.registration import PluginServer


def not_ready(agent: Agent, plugin: PluginServer) -> str | None:
    """Why the node cannot take pods now, or ``None`` when it can."""
    if not plugin.registered.is_set():
        return f"not registered with kubelet (waiting for {plugin.kubelet_socket})"
    down = agent.mode.down_reason()
    if down is not None:
        return f"isolation {agent.mode.name!r} is down: {down}"
    return None


def app(
    registry: prometheus_client.CollectorRegistry,
    *,
    not_ready: Callable[[], str | None],
    not_live: Callable[[], str | None] = lambda: None,
) -> aiohttp.web.Application:
    """``/metrics`` of ``registry``; ``/healthz`` and ``/readyz`` answer from their callables."""

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        reason = not_live()
        if reason is None:
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text=f"{reason}\n")

    async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        reason = not_ready()
        if reason is None:
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text=f"{reason}\n")

    async def exposition(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            body=prometheus_client.generate_latest(registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    application = aiohttp.web.Application()
    application.router.add_get("/healthz", healthz)
    application.router.add_get("/readyz", readyz)
    application.router.add_get("/metrics", exposition)
    return application


@contextlib.asynccontextmanager
async def listening(
    application: aiohttp.web.Application, host: str, port: int
) -> AsyncIterator[None]:
    """Serve ``application`` on ``host:port`` for the duration of the block."""
    # No access log: kubelet's probes and Prometheus' scrapes would fill the agent's log.
    runner = aiohttp.web.AppRunner(application, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, host, port).start()
        yield
    finally:
        await runner.cleanup()
