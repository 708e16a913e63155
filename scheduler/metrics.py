"""The extender's Prometheus metrics, on a registry of its own (several extenders fit one process).

Request latency by verb, binds by result, filter failures by reason, watch restarts; and, read from
the ledger at scrape time (no cost per bind), every card's granted and capacity bytes and the
nodes by state.
"""

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpushare.scheduler import ledger

__all__ = ["BIND_RESULTS", "PREEMPT_OUTCOMES", "WATCHED", "WATCH_CAUSES", "Metrics"]

BIND_RESULTS: Final = ("bound", "no-fit", "conflict", "api-error", "bad-request")
PREEMPT_OUTCOMES: Final = ("kept", "chosen", "refused")
"""Values of the ``result`` label of ``gpushare_scheduler_binds_total``."""
WATCHED: Final = ("nodes", "pods")
WATCH_CAUSES: Final = ("end", "expired", "error")
"""Why a watch starts again: it ended (normal), its version expired (410 Gone), it failed."""

# Filter over thousands of nodes takes about a millisecond; a bind waits for the apiserver.
_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric of one extender."""

    def __init__(self, registry: CollectorRegistry, book: ledger.Ledger) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "gpushare_scheduler_request_duration_seconds",
            "Time to answer one extender call, by verb (filter, prioritize, bind, preempt).",
            ["verb"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.binds = Counter(
            "gpushare_scheduler_binds_total",
            "Bind calls by result: bound, no-fit, conflict, api-error, bad-request.",
            ["result"],
            registry=registry,
        )
        self.filter_failures = Counter(
            "gpushare_scheduler_filter_failures_total",
            "Nodes that a filter call turned down, by reason.",
            ["reason"],
            registry=registry,
        )
        self.bad_requests = Counter(
            "gpushare_scheduler_bad_requests_total",
            "Extender calls refused as malformed (HTTP 400), by verb.",
            ["verb"],
            registry=registry,
        )
        self.watch_restarts = Counter(
            "gpushare_scheduler_watch_restarts_total",
            "Watches started again, by resource and cause (end, expired: 410 Gone, error).",
            ["resource", "cause"],
            registry=registry,
        )
        self.preempt_nodes = Counter(
            "gpushare_scheduler_preempt_nodes_total",
            "Nodes of preempt calls, by outcome: kept (kube-scheduler's victims free a card),"
            " chosen (other victims on one card), refused (no card can be freed).",
            ["outcome"],
            registry=registry,
        )
        for verb in ("filter", "prioritize", "bind", "preempt"):
            self.request_seconds.labels(verb)
        for outcome in PREEMPT_OUTCOMES:
            self.preempt_nodes.labels(outcome)
        for result in BIND_RESULTS:
            self.binds.labels(result)
        for reason in ledger.Reason:
            self.filter_failures.labels(reason.value)
        for resource in WATCHED:
            for cause in WATCH_CAUSES:
                self.watch_restarts.labels(resource, cause)
        registry.register(_LedgerCollector(book))


class _LedgerCollector(Collector):
    def __init__(self, book: ledger.Ledger) -> None:
        self._book = book

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "card", "index"]
        granted = GaugeMetricFamily(
            "gpushare_scheduler_card_granted_bytes",
            "Memory granted on a card: pods' grants plus per-allocation overhead.",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "gpushare_scheduler_card_capacity_bytes",
            "A card's CUDA-visible memory (NVML total less the driver's reserve).",
            labels=labels,
        )
        room = GaugeMetricFamily(
            "gpushare_scheduler_card_room_bytes",
            "What a new grant may still take on a card (0 when unhealthy).",
            labels=labels,
        )
        for card in self._book.cards():
            values = [card.node, card.uuid, str(card.index)]
            granted.add_metric(values, card.granted_bytes)
            capacity.add_metric(values, card.capacity_bytes)
            room.add_metric(values, card.room_bytes if card.healthy else 0)
        nodes = GaugeMetricFamily(
            "gpushare_scheduler_nodes",
            "Nodes in the ledger by state: ready, stale-heartbeat, no-report, bad-report.",
            labels=["state"],
        )
        for state, count in sorted(self._book.node_states().items()):
            nodes.add_metric([state], count)
        grants = GaugeMetricFamily(
            "gpushare_scheduler_pods_granted", "Pods holding GPU memory in the ledger."
        )
        grants.add_metric([], self._book.grant_count())
        yield from (granted, capacity, room, nodes, grants)
