"""kube-scheduler's side of the extender protocol: filter, prioritize, bind over HTTP.

As the ``gpushare-scheduler`` profile configures it (``nodeCacheCapable: true``, so ``NodeNames``
travel instead of whole Nodes; ``bindVerb`` set, so the extender binds). The in-tree plugins pass
every node here: the simulated nodes have CPU and memory to spare and no taints, and a node's total
of the extender's resource (which ``NodeResourcesFit`` counts) is never short where a card has room.
Among the best-scored nodes one is picked at random, as
kube-scheduler's ``selectHost`` does.
"""

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from gpushare.core import errors

CALL_SECONDS: Final = 30.0
"""kube-scheduler's extender ``httpTimeout`` in the manifests is shorter; a simulation may wait."""
EXTENDER_WEIGHT: Final = 1
"""The extender's ``weight``: only relative order matters when every in-tree score ties."""


@dataclass(frozen=True, slots=True)
class Bound:
    """The extender bound the pod to ``node``."""

    node: str


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """No node passed; ``message`` is the FailedScheduling Event's text."""

    message: str
    unresolvable: bool


@dataclass(frozen=True, slots=True)
class BindFailed:
    """The extender refused or failed the bind; kube-scheduler would retry the pod."""

    message: str


class SchedulerClient:
    """Calls one extender as kube-scheduler does."""

    def __init__(self, url: str, *, rng: random.Random) -> None:
        self._url = url.rstrip("/")
        self._rng = rng
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_SECONDS))

    async def close(self) -> None:
        await self._session.close()

    async def schedule(
        self, pod: Mapping[str, Any], nodes: Sequence[str]
    ) -> Bound | Unschedulable | BindFailed:
        """One scheduling cycle for ``pod`` over the candidate ``nodes``."""
        filtered = await self._call("filter", {"Pod": pod, "Nodes": None, "NodeNames": list(nodes)})
        if filtered.get("Error"):
            return Unschedulable(f"extender filter error: {filtered['Error']}", False)
        passing: list[str] = filtered.get("NodeNames") or []
        if not passing:
            failed: dict[str, str] = dict(filtered.get("FailedNodes") or {})
            unresolvable: dict[str, str] = dict(filtered.get("FailedAndUnresolvableNodes") or {})
            return Unschedulable(
                _failed_scheduling(len(nodes), {**failed, **unresolvable}), bool(unresolvable)
            )
        scores = await self._call("prioritize", {"Pod": pod, "Nodes": None, "NodeNames": passing})
        if not isinstance(scores, list):
            raise errors.Conflict(f"extender prioritize answered {scores!r:.200}, not a list")
        by_node = {entry["Host"]: int(entry["Score"]) * EXTENDER_WEIGHT for entry in scores}
        best = max(by_node.get(node, 0) for node in passing)
        node = self._rng.choice([n for n in passing if by_node.get(n, 0) == best])
        meta = pod["metadata"]
        result = await self._call(
            "bind",
            {"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"],
             "Node": node},
        )
        if result.get("Error"):
            return BindFailed(str(result["Error"]))
        return Bound(node)

    async def _call(self, verb: str, body: Mapping[str, Any]) -> Any:
        try:
            async with self._session.post(f"{self._url}/{verb}", json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise errors.Conflict(
                        f"extender {verb} answered HTTP {response.status}: {text}"
                    )
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.Conflict(f"extender {verb} failed: {exc!r}") from exc


def _failed_scheduling(total: int, reasons: Mapping[str, str]) -> str:
    """kube-scheduler's message: ``0/4 nodes are available: 3 <reason>, 1 <reason>.``"""
    counts = Counter(reasons.values())
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda i: -i[1]))
    return f"0/{total} nodes are available: {parts}."
