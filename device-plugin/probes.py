"""What the agent's probes answer (the listener is :mod:`gpushare.runtime.probes`): ``/metrics``
for Prometheus, ``/healthz`` and ``/readyz`` for kubelet.

``/healthz`` answers 200 while the agent's event loop answers and its poll loop keeps its pace; a
poll loop stuck past :data:`agent.STALL_SECONDS` answers 503 with the reason, so kubelet's liveness
probe restarts the agent (a wedged event loop answers nothing, which fails the probe too).
``/readyz`` answers once the plugin is registered with kubelet and its isolation is up (in an MPS
mode nothing is granted while the daemon or its control program is missing); until then it
answers 503 with the reason.
"""

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
