"""Prometheus metrics of the webhook, in a registry of its own (several fit one process)."""

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Seconds; the apiserver waits at most ``timeoutSeconds`` (10 s) and we aim for p99 under 10 ms."""


class WebhookMetrics:
    """Admissions by webhook and outcome, their latency, denials by reason, and the cards known."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "gpushare_webhook_requests_total",
            "Admission requests answered, by webhook (path), operation and outcome"
            " (allowed, mutated, denied, malformed).",
            ["webhook", "operation", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "gpushare_webhook_request_duration_seconds",
            "Time to answer one admission request, from the body read to the response built.",
            ["webhook"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.denials = Counter(
            "gpushare_webhook_denials_total",
            "Admissions refused, by webhook and reason code.",
            ["webhook", "reason"],
            registry=registry,
        )
        self.largest_card = Gauge(
            "gpushare_webhook_largest_card_bytes",
            "The largest CUDA total (NVML total less the driver's reserve) of any node's GPU"
            " (0 while none reports one): what bounds a request.",
            registry=registry,
        )
        self.reporting_nodes = Gauge(
            "gpushare_webhook_reporting_nodes",
            "Nodes whose agent report the webhook has read.",
            registry=registry,
        )
