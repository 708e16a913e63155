"""The agent with the DRA backend: a ResourceSlice and a kubelet DRA plugin, no device plugin.

Same agent (NVML readings, health, node report, isolation, watchdog, exporter); what differs is
how kubelet learns of the cards (a ResourceSlice the scheduler's allocator reads) and how a grant
reaches the container (``NodePrepareResources`` and a CDI spec).
"""

import asyncio
import contextlib
from pathlib import Path

import aiohttp.web

from gpushare.deviceplugin import kube
from gpushare.deviceplugin.agent import Agent, guard
from gpushare.deviceplugin.dra.claims import Claims
from gpushare.deviceplugin.dra.kube import DraApi
from gpushare.deviceplugin.dra.publisher import Publisher
from gpushare.deviceplugin.dra.server import DraServer
from gpushare.runtime import probes as runtime_probes


async def serve(
    agent: Agent,
    *,
    api: DraApi,
    kubelet_dir: Path,
    pods: kube.PodCache | None = None,
    listen: tuple[str, int] | None = None,
) -> None:
    """Start ``agent``; publish its slice and serve the DRA plugin until cancelled, with the watch
    of the node's pods (``pods``: the agent's cache, through which the watchdog and the escape
    checks find the containers that use a prepared claim)."""
    publisher = Publisher(api, node=agent.node, settings=agent.settings)
    claims = Claims(agent, api, cdi_dir=agent.settings.agent.cdi_spec_dir)

    def registered(ok: bool) -> None:
        agent.metrics.registered.set(1 if ok else 0)
        if ok:  # a kubelet that just started has wiped the node's slices
            publisher.forget()

    server = DraServer(claims, kubelet_dir=kubelet_dir, on_registration=registered)

    def not_ready() -> str | None:
        if not publisher.published:
            return "the node's ResourceSlice is not written yet"
        if not server.registration.registered.is_set():
            return f"not registered with kubelet (waiting on {server.registration_socket})"
        down = agent.mode.down_reason()
        return None if down is None else f"isolation {agent.mode.name!r} is down: {down}"

    async def every_poll() -> None:
        while True:
            await publisher.offer(agent.card_reports())
            await asyncio.sleep(agent.settings.agent.poll_seconds)

    async with contextlib.AsyncExitStack() as stack:
        if listen is not None:
            application = runtime_probes.add_routes(
                aiohttp.web.Application(), agent.metrics.registry, not_ready=not_ready
            )
            await stack.enter_async_context(runtime_probes.listening(application, *listen))
        claims.adopt()
        await agent.start()
        async with asyncio.TaskGroup() as group:
            group.create_task(agent.run_loops())
            group.create_task(guard("dra-plugin", server.run))
            group.create_task(guard("resourceslice", every_poll))
            if pods is not None:
                group.create_task(guard("pod-watch", pods.run))
