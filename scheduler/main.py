"""``gpushare scheduler``: the kube-scheduler extender, a sidecar of a stock kube-scheduler."""

import argparse
import asyncio
import gc
import signal
from pathlib import Path

import uvloop

from gpushare.core import config, placement
from gpushare.runtime import connection
from gpushare.scheduler.kube import Kube
from gpushare.scheduler.service import Extender

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="address to serve on (default 0.0.0.0:8888)"
    )
    parser.add_argument(
        "--url-prefix",
        metavar="PATH",
        help="path before /filter, /prioritize and /bind (default /gpushare-scheduler)",
    )
    parser.add_argument(
        "--policy", choices=placement.POLICIES, help="cluster-wide placement (default fill)"
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help=connection.FLAG_HELP,
    )


async def _freeze_when_synced(extender: Extender, stop: asyncio.Event) -> None:
    """Once the ledger holds the cluster, take it out of the garbage collector's rounds.

    The first listing leaves hundreds of thousands of long-lived objects (nodes, cards, grants);
    every full collection would walk them all, stalling calls for tens of milliseconds.
    """
    synced = asyncio.ensure_future(extender.watcher.wait_synced())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((synced, stopping), return_when=asyncio.FIRST_COMPLETED)
    for task in (synced, stopping):
        task.cancel()
    if extender.watcher.synced:
        extender.book.settle()
        gc.collect()
        gc.freeze()


def run(args: argparse.Namespace) -> int:
    settings = config.load(
        overrides={
            "scheduler.listen": args.listen,
            "scheduler.url_prefix": args.url_prefix,
            "policy": args.policy,
        }
    )
    host, port = config.parse_listen(settings.scheduler.listen)
    # uvloop: the extender spends most of its time in HTTP machinery, which it runs far faster.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(settings, host=host, port=port, kubeconfig=args.kubeconfig))
    return 0


async def _serve(
    settings: config.Settings, *, host: str, port: int, kubeconfig: Path | None
) -> None:
    kube = await Kube.connect(kubeconfig)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Extender(settings, kube) as extender:
            await extender.start(host=host, port=port)
            await _freeze_when_synced(extender, stop)
            await stop.wait()
    finally:
        await kube.close()
