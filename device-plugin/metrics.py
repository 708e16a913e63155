"""The agent's Prometheus metrics, in base units, on a registry of its own.

Card and container gauges are read from the agent's latest state at scrape time, so a card or a
container that goes away leaves no stale series behind. Counters count events since start.
"""

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpushare.core.config import Isolation
from gpushare.deviceplugin.escapes import Finding
from gpushare.deviceplugin.nvml import CardReading
from gpushare.deviceplugin.watchdog import ContainerUsage

CARD_LABELS: Final = ("node", "gpu_uuid", "gpu_index", "model")
CONTAINER_LABELS: Final = ("node", "gpu_uuid", "gpu_index", "namespace", "pod", "container")


@dataclass(frozen=True)
class CardState:
    """What the exporter shows of one card."""

    reading: CardReading
    granted_bytes: int
    healthy: bool
    mps_servers: int


class Metrics:
    """Every metric of one agent (one node)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry, *, node: str) -> None:
        self.registry = registry
        self.node = node
        self._lock = threading.Lock()
        self._cards: list[CardState] = []
        self._containers: list[ContainerUsage] = []
        self.isolation: Isolation | None = None
        """The node's isolation, once the agent has chosen it."""
        self.registered = prometheus_client.Gauge(
            "gpushare_device_plugin_registered",
            "1 while the device plugin is registered with kubelet",
            ["node"],
            registry=registry,
        ).labels(node)
        self.registrations = prometheus_client.Counter(
            "gpushare_device_plugin_registrations",
            "Registrations with kubelet (each kubelet restart adds one)",
            ["node"],
            registry=registry,
        ).labels(node)
        self.violations = prometheus_client.Counter(
            "gpushare_grant_violations",
            "Containers found over their grant past the grace period",
            ["node", "namespace", "pod", "container"],
            registry=registry,
        )
        self.escapes = prometheus_client.Counter(
            "gpushare_isolation_escapes",
            "Containers caught leaving their isolation, by escape (outside-mps, own-mps-daemon,"
            " over-limit)",
            ["node", "namespace", "pod", "container", "escape"],
            registry=registry,
        )
        self.allocations = prometheus_client.Counter(
            "gpushare_device_plugin_allocations",
            "Allocate calls per container, by result (ok, refused)",
            ["node", "result"],
            registry=registry,
        )
        self.reports = prometheus_client.Counter(
            "gpushare_node_reports",
            "Node reports written to the API server",
            ["node"],
            registry=registry,
        ).labels(node)
        self.poll_seconds = prometheus_client.Histogram(
            "gpushare_agent_poll_duration_seconds",
            "Time to read NVML and update the agent's state",
            ["node"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        ).labels(node)
        registry.register(_StateCollector(self))

    def set_cards(self, cards: Iterable[CardState]) -> None:
        """Replace the card state shown."""
        with self._lock:
            self._cards = list(cards)

    def set_containers(self, usages: Iterable[ContainerUsage]) -> None:
        """Replace the container state shown."""
        with self._lock:
            self._containers = list(usages)

    def violation(self, item: ContainerUsage) -> None:
        """Count a container found over its grant."""
        self.violations.labels(self.node, item.pod.namespace, item.pod.name, item.container).inc()

    def escape(self, finding: Finding) -> None:
        """Count a container caught leaving its isolation."""
        pod = finding.pod
        self.escapes.labels(
            self.node, pod.namespace, pod.name, finding.container, finding.escape
        ).inc()

    def snapshot(self) -> tuple[list[CardState], list[ContainerUsage]]:
        """The state shown now."""
        with self._lock:
            return list(self._cards), list(self._containers)


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        cards, containers = self._metrics.snapshot()
        node = self._metrics.node
        families = {
            "total": GaugeMetricFamily(
                "gpushare_card_total_bytes", "Card memory (NVML total)", labels=CARD_LABELS
            ),
            "reserved": GaugeMetricFamily(
                "gpushare_card_reserved_bytes",
                "Memory the driver reserves (unseen by CUDA)",
                labels=CARD_LABELS,
            ),
            "used": GaugeMetricFamily(
                "gpushare_card_used_bytes", "Card memory in use (NVML)", labels=CARD_LABELS
            ),
            "free": GaugeMetricFamily(
                "gpushare_card_free_bytes", "Card memory free (NVML)", labels=CARD_LABELS
            ),
            "granted": GaugeMetricFamily(
                "gpushare_card_granted_bytes",
                "Memory granted to containers on the card",
                labels=CARD_LABELS,
            ),
            "util": GaugeMetricFamily(
                "gpushare_card_utilization_ratio",
                "Fraction of time a kernel ran (NVML)",
                labels=CARD_LABELS,
            ),
            "healthy": GaugeMetricFamily(
                "gpushare_card_healthy", "1 if the card may be granted", labels=CARD_LABELS
            ),
            "servers": GaugeMetricFamily(
                "gpushare_card_mps_servers", "MPS servers counted on the card", labels=CARD_LABELS
            ),
            "limits": GaugeMetricFamily(
                "gpushare_card_memory_limits_supported",
                "1 if the driver holds per-cgroup memory limits on the card (r615+, no MIG)",
                labels=CARD_LABELS,
            ),
        }
        for card in cards:
            r = card.reading
            labels = [node, r.uuid, str(r.index), r.model]
            families["healthy"].add_metric(labels, 1.0 if card.healthy else 0.0)
            families["granted"].add_metric(labels, card.granted_bytes)
            families["servers"].add_metric(labels, card.mps_servers)
            families["limits"].add_metric(labels, 1.0 if r.memory_limits else 0.0)
            if r.error is None:
                families["total"].add_metric(labels, r.total_bytes)
                families["reserved"].add_metric(labels, r.reserved_bytes)
                families["used"].add_metric(labels, r.used_bytes)
                families["free"].add_metric(labels, r.free_bytes)
                if r.utilization is not None:
                    families["util"].add_metric(labels, r.utilization)
        used = GaugeMetricFamily(
            "gpushare_container_used_bytes",
            "GPU memory a container's processes use",
            labels=CONTAINER_LABELS,
        )
        granted = GaugeMetricFamily(
            "gpushare_container_granted_bytes",
            "GPU memory granted to a container",
            labels=CONTAINER_LABELS,
        )
        index = {card.reading.uuid: str(card.reading.index) for card in cards}
        for item in containers:
            labels = [
                node,
                item.card,
                index.get(item.card, ""),
                item.pod.namespace,
                item.pod.name,
                item.container,
            ]
            used.add_metric(labels, item.used_bytes)
            granted.add_metric(labels, item.granted_bytes)
        isolation = GaugeMetricFamily(
            "gpushare_node_isolation",
            "1 for the isolation this node's agent runs (cgroup, mps, mps-shared or none)",
            labels=("node", "isolation"),
        )
        if self._metrics.isolation is not None:
            isolation.add_metric([node, self._metrics.isolation], 1.0)
        yield from families.values()
        yield used
        yield granted
        yield isolation
