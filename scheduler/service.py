"""One extender assembled: ledger, watcher, binder and HTTP server, started and stopped together.

``gpushare scheduler`` runs one; tests, benchmarks and the simulator run several in one process,
each with its own metrics registry.
"""

import asyncio
import logging
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from gpushare.core import config
from gpushare.scheduler import ledger, server
from gpushare.scheduler.binding import Binder
from gpushare.scheduler.kube import Kube
from gpushare.scheduler.metrics import Metrics
from gpushare.scheduler.watching import Watcher

__all__ = ["Extender"]

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS: Final = 5.0
"""Grace for calls in flight when the extender stops (kube-scheduler's httpTimeout is shorter)."""


class Extender:
    """A running extender. ``watch=False`` leaves the ledger to its owner (benchmarks)."""

    def __init__(
        self,
        settings: config.Settings,
        kube: Kube,
        *,
        registry: CollectorRegistry | None = None,
        watch: bool = True,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.book = ledger.Ledger(
            overhead_bytes=settings.allocation_overhead_bytes,
            card_overhead_bytes=settings.card_overhead_bytes,
            heartbeat_timeout_seconds=settings.scheduler.heartbeat_timeout_seconds,
        )
        self.metrics = Metrics(registry or CollectorRegistry(), self.book)
        self.watcher = Watcher(kube=kube, book=self.book, settings=settings, metrics=self.metrics)
        self.binder = Binder(
            book=self.book, kube=kube, settings=settings, metrics=self.metrics, instance=instance
        )
        self._watch = watch
        self._watch_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0

    def ready(self) -> bool:
        """Whether the ledger is in step with the cluster (``/readyz``)."""
        if not self._watch:
            return True
        task = self._watch_task
        return self.watcher.synced and task is not None and not task.done()

    @property
    def url(self) -> str:
        """The extender's URL prefix, as kube-scheduler's ``urlPrefix`` names it."""
        prefix = self.settings.scheduler.url_prefix.strip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}" + (f"/{prefix}" if prefix else "")

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0: any free port, see :attr:`port`) and start watching."""
        if self._watch:
            self._watch_task = asyncio.get_running_loop().create_task(
                self.watcher.run(), name="gpushare watcher"
            )
            self._watch_task.add_done_callback(_report_end)
        app = server.make_app(
            book=self.book,
            binder=self.binder,
            settings=self.settings,
            metrics=self.metrics,
            ready=self.ready,
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.host = host
        self.port = self._runner.addresses[0][1]
        logger.info("extender serving on %s", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        await self.binder.close()

    async def __aenter__(self) -> "Extender":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _report_end(task: "asyncio.Task[None]") -> None:
    if task.cancelled():
        return
    exc = task.exception()
    logger.error("the watcher stopped; the extender is no longer ready", exc_info=exc)
