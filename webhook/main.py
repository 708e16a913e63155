"""``gpushare webhook``: the admission webhook process.

It serves admission over HTTPS on ``--listen`` with the pair from ``--tls-cert``/``--tls-key``
(files, such as a mounted Secret, read again when they change; :mod:`.server`) and ``/healthz``,
``/readyz`` and ``/metrics`` over HTTP on ``--probe-listen``. kopf watches Nodes (for the largest
card the agents report) with the Kubernetes API from ``--kubeconfig``, ``KUBECONFIG`` or the pod's
service account, and handles SIGTERM and SIGINT. The webhook configurations are installed from
``manifests/webhook/``.
"""

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import socket
from pathlib import Path
from typing import Any, Final

import aiohttp.web
import kopf
from prometheus_client import CollectorRegistry

from gpushare.core import config, errors
from gpushare.runtime import connection, probes
from gpushare.webhook import handlers, inventory, login, server
from gpushare.webhook.metrics import WebhookMetrics
from gpushare.webhook.templates import Templates

logger = logging.getLogger(__name__)

DEFAULT_PROBE_LISTEN: Final = "0.0.0.0:8080"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``gpushare webhook``."""
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="HTTPS admission address (default 0.0.0.0:9443)"
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", type=Path, required=True, help="serving certificate (PEM)"
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", type=Path, required=True, help="its private key (PEM)"
    )
    parser.add_argument(
        "--probe-listen",
        metavar="HOST:PORT",
        default=DEFAULT_PROBE_LISTEN,
        help=f"HTTP address of /healthz, /readyz and /metrics (default {DEFAULT_PROBE_LISTEN})",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        type=Path,
        help=connection.FLAG_HELP,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    settings = config.load(overrides={"webhook.listen": args.listen})
    for path in (args.tls_cert, args.tls_key):
        if not path.is_file():
            raise errors.ConfigError(f"{path} is not a readable file (make a pair: gpushare certs)")
    # kopf logs every Node event at INFO; our handlers log each admission decision once.
    logging.getLogger("kopf").setLevel(max(logging.WARNING, logging.getLogger().level))
    pair = {"tls_cert": args.tls_cert, "tls_key": args.tls_key}
    asyncio.run(serve(settings, **pair, probe_listen=args.probe_listen, kubeconfig=args.kubeconfig))
    return 0


async def serve(
    settings: config.Settings,
    *,
    tls_cert: Path,
    tls_key: Path,
    probe_listen: str,
    kubeconfig: Path | None = None,
) -> None:
    """Run the webhook until SIGTERM or SIGINT.

    kopf takes both signals over (in the main thread, where the command runs it) and stops at
    once. It gets no stop flag: kopf would leave its waiter for a flag that no signal sets pending,
    and give such leftover tasks 5 s before returning.
    """
    host, port = config.parse_listen(settings.webhook.listen)
    probe_host, probe_port = config.parse_listen(probe_listen)
    await login.connection_info(kubeconfig)  # unusable credentials stop us here, not in a loop
    metrics = WebhookMetrics(CollectorRegistry())
    cards = inventory.Cards()
    metrics.largest_card.set_function(lambda: float(cards.largest() or 0))
    metrics.reporting_nodes.set_function(lambda: float(cards.nodes()))

    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login.handler(kubeconfig))
    templates = await Templates.connect(kubeconfig, settings)  # pods put on the DRA backend
    handlers.register(registry, cards=cards)
    admission = server.AdmissionServer(
        routes=handlers.routes(
            settings=settings, metrics=metrics, cards=cards, templates=templates
        ),
        metrics=metrics,
        host=host,
        port=port,
        cert=tls_cert,
        key=tls_key,
    )
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.posting.enabled = False  # decisions go to the admission response and our log

    probe_routes = probes.add_routes(
        aiohttp.web.Application(),
        metrics.registry,
        not_ready=lambda: None if admission.listening.is_set() else NOT_LISTENING,
    )
    try:
        async with probes.listening(probe_routes, probe_host, probe_port):
            await admission.start()
            logger.info(
                "admission on https://%s:%d, probes and metrics on http://%s:%d",
                host or "*",
                port,
                probe_host or "*",
                probe_port,
            )
            # Everything loaded so far lives as long as the process: keep it out of the collector's
            # full passes, which would otherwise scan it in the middle of an admission request.
            gc.freeze()
            with contextlib.suppress(asyncio.CancelledError):
                await kopf.operator(
                    registry=registry,
                    settings=kopf_settings,
                    clusterwide=True,
                    standalone=True,
                    identity=_identity(),
                )
            logger.info("admission stopped; exiting")
    finally:
        await admission.stop()
        if templates is not None:
            await templates.close()


NOT_LISTENING: Final = "admission server not listening yet"


def _identity() -> Any:
    """This process's name for kopf (its peering is off): the pod's name (kopf's ``POD_ID``), else
    the host's. Left to itself kopf asks the password database for the user's name, and an
    image's unprivileged uid (the Dockerfile's 65532) need have no entry there."""
    return os.environ.get("POD_ID") or socket.gethostname()
