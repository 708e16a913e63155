"""The admission webhook: what it admits, mutates and denies, and why."""

from grafana_foundation_sdk.models import dashboard as models

from dashboards.common import RATE, Board, query

UID = "gpushare-webhook"


def build() -> models.Dashboard:
    board = Board(
        UID,
        "gpushare / Webhook",
        "Admission of InferenceServices (validating) and Pods (mutating): volume, denials, "
        "latency.",
    )

    board.row("Admissions")
    board.timeseries(
        "Admissions",
        "Admission reviews per second, by webhook (InferenceService validation, Pod mutation) "
        "and outcome: allowed, mutated, denied, malformed.",
        query(
            f"sum by (webhook, outcome) (rate(gpushare_webhook_requests_total[{RATE}]))",
            "{{webhook}} {{outcome}}",
        ),
        unit="reqps",
    )
    board.timeseries(
        "Admission latency",
        "Time to answer one admission review, 50th and 99th percentile (the apiserver waits).",
        query(
            "histogram_quantile(0.5, sum by (le, webhook)"
            f" (rate(gpushare_webhook_request_duration_seconds_bucket[{RATE}])))",
            "{{webhook}} p50",
        ),
        query(
            "histogram_quantile(0.99, sum by (le, webhook)"
            f" (rate(gpushare_webhook_request_duration_seconds_bucket[{RATE}])))",
            "{{webhook}} p99",
        ),
        unit="s",
    )

    board.row("Denials")
    board.timeseries(
        "Denials, by reason",
        "Requests refused, by reason: a bad quantity, a near-miss annotation key, more than one "
        "GPU, a reserved environment variable...",
        query(
            f"sum by (webhook, reason) (rate(gpushare_webhook_denials_total[{RATE}]))",
            "{{webhook}}: {{reason}}",
        ),
        unit="reqps",
    )
    board.table(
        "Denials in the time range",
        "How many requests each reason refused over the dashboard's time range.",
        query(
            "sum by (webhook, reason) (increase(gpushare_webhook_denials_total[$__range]))",
            instant=True,
        ),
        columns=("denials",),
        width=12,
    )

    board.row("What it knows")
    board.stat(
        "Largest card",
        "The largest GPU any agent reports: a request above it is denied.",
        query("max(gpushare_webhook_largest_card_bytes)"),
        unit="bytes",
        width=6,
    )
    board.stat(
        "Reporting nodes",
        "Nodes whose agent report the webhook has read.",
        query("max(gpushare_webhook_reporting_nodes)"),
        width=6,
    )
    return board.build()
