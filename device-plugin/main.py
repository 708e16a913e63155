"""``gpushare device-plugin``: the kubelet device plugin and GPU agent of one node.

    gpushare device-plugin --kubelet-dir DIR --nvml real|fake:FILE --metrics-listen HOST:PORT

The node's name comes from ``--node-name``, else the ``NODE_NAME`` variable (the DaemonSet sets it
from ``spec.nodeName``). The Kubernetes API comes from ``--kubeconfig``, KUBECONFIG or the pod's
service account. :func:`serve` runs a built :class:`Agent`, so another program (the simulator) can
run several agents in one process with its own NVML and API endpoint.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import get_args

import aiohttp.web
import prometheus_client

from gpushare.core import config, errors, names
from gpushare.core.config import Settings
from gpushare.deviceplugin import kube, mps, nvml, probes
from gpushare.deviceplugin.agent import Agent, guard
from gpushare.deviceplugin.dra import kube as dra_kube
from gpushare.deviceplugin.dra import main as dra_main
from gpushare.deviceplugin.dra import publisher as dra_publisher
from gpushare.deviceplugin.metrics import Metrics
from gpushare.deviceplugin.podresources import PodResourcesClient
from gpushare.deviceplugin.registration import PluginServer
from gpushare.deviceplugin.watchdog import CgroupLocator
from gpushare.runtime import connection
from gpushare.runtime import probes as runtime_probes

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The device plugin's flags."""
    parser.add_argument(
        "--kubelet-dir", type=Path, help="kubelet's folder (default /var/lib/kubelet)"
    )
    parser.add_argument("--nvml", default="real", help="'real' or 'fake:FILE' (default real)")
    parser.add_argument(
        "--metrics-listen",
        default="0.0.0.0:9400",
        help="HOST:PORT of /metrics, /healthz and /readyz (default 0.0.0.0:9400)",
    )
    parser.add_argument("--node-name", help="this node's name (default: $NODE_NAME)")
    parser.add_argument(
        "--isolation",
        choices=list(get_args(config.IsolationSetting)),
        help="override the configured isolation",
    )
    parser.add_argument("--kubeconfig", type=Path, help=connection.FLAG_HELP)
    parser.add_argument(
        "--proc-root", type=Path, default=Path("/proc"), help="procfs of the host (default /proc)"
    )
    parser.add_argument(
        "--mps-control", default=mps.CONTROL, help=f"MPS control program (default {mps.CONTROL})"
    )
    parser.add_argument(
        "--mps-cgroup",
        type=Path,
        help="a cgroup v2 folder (as mounted from the host) to move MPS daemons into, so that"
        " they outlive this pod (default: none; they end with the pod)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the agent from flags and configuration and run it until SIGTERM."""
    settings = config.load(
        overrides={"agent.kubelet_dir": args.kubelet_dir, "isolation": args.isolation}
    )
    node = args.node_name or os.environ.get("NODE_NAME")
    if not node:
        raise errors.ConfigError("no node name: pass --node-name or set NODE_NAME")
    host, port = config.parse_listen(args.metrics_listen)
    asyncio.run(_main(settings, args, node=node, host=host, port=port))
    return 0


async def _main(
    settings: Settings, args: argparse.Namespace, *, node: str, host: str, port: int
) -> None:
    backend = nvml.open_backend(args.nvml)
    registry = prometheus_client.CollectorRegistry()
    metrics = Metrics(registry, node=node)
    api = await kube.KubeApi.connect(args.kubeconfig)
    dra_api = dra_kube.KubeDraApi(api.api_client)
    try:
        labels = await dra_api.node_labels(node)
    except errors.GpushareError as exc:
        await api.close()
        backend.close()
        raise errors.ConfigError(f"cannot read node {node}'s labels: {exc}") from exc
    chosen = config.backend_for(labels, settings.backend)
    if chosen != settings.backend:
        logger.info("node %s is labelled %s=%s", node, names.LABEL_BACKEND, chosen)
        settings = settings.model_copy(update={"backend": chosen})
    pods = kube.PodCache(api, node)
    kubelet_dir = settings.agent.kubelet_dir
    agent = Agent(
        settings,
        node=node,
        nvml=backend,
        mode=await asyncio.to_thread(
            mps.make,
            settings.isolation,
            settings.agent.mps_root,
            control=args.mps_control,
            cgroup=args.mps_cgroup,
            nvml=backend,
        ),
        metrics=metrics,
        api=api,
        pods=pods,
        podresources=(
            None  # DRA claims are not device-plugin IDs: the claims' CDI specs are the truth
            if settings.backend == "dra"
            else PodResourcesClient(kubelet_dir / "pod-resources" / "kubelet.sock")
        ),
        locator=CgroupLocator(args.proc_root),
    )
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await dra_publisher.check_exclusive(dra_api, node=node, backend=settings.backend)
        if settings.backend == "dra":
            await dra_main.serve(
                agent, api=dra_api, kubelet_dir=kubelet_dir, pods=pods, listen=(host, port)
            )
        else:
            await serve(agent, kubelet_dir=kubelet_dir, pods=pods, listen=(host, port))
    except asyncio.CancelledError:
        logger.info("stopping")
    finally:
        await api.close()
        backend.close()


async def serve(
    agent: Agent,
    *,
    kubelet_dir: Path,
    pods: kube.PodCache | None = None,
    listen: tuple[str, int] | None = None,
) -> None:
    """Start ``agent`` and run it with its plugin server until cancelled.

    With ``listen`` (host, port), ``/metrics``, ``/healthz`` and ``/readyz`` are served there from
    before the agent's first reading until it stops.
    """
    plugin = PluginServer(agent, kubelet_dir=kubelet_dir)
    async with contextlib.AsyncExitStack() as stack:
        if listen is not None:
            application = runtime_probes.add_routes(
                aiohttp.web.Application(),
                agent.metrics.registry,
                not_ready=lambda: probes.not_ready(agent, plugin),
                not_live=agent.stalled,
            )
            await stack.enter_async_context(runtime_probes.listening(application, *listen))
        await agent.start()
        async with asyncio.TaskGroup() as group:
            group.create_task(agent.run_loops())
            group.create_task(guard("plugin", plugin.run))
            if pods is not None:
                group.create_task(guard("pod-watch", pods.run))
