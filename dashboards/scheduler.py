"""The scheduler extender: how fast it answers, what it binds, and why pods do not fit.

Both replicas keep a ledger and export it; only the leader's kube-scheduler calls its extender.
Ledger gauges are therefore taken with ``max`` (not summed twice), call rates with ``sum``.
"""

from grafana_foundation_sdk.models import dashboard as models

from dashboards.common import RATE, Board, query

UID = "gpushare-scheduler"


def _quantile(q: float, verb: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le)"
        f' (rate(gpushare_scheduler_request_duration_seconds_bucket{{verb="{verb}"}}[{RATE}])))'
    )


def build() -> models.Dashboard:
    board = Board(
        UID,
        "gpushare / Scheduler",
        "The gpushare-scheduler extender: latency, binds, and the reasons pods do not fit.",
    )

    board.row("Calls from kube-scheduler")
    board.timeseries(
        "Calls",
        "Extender calls per second, by verb (filter, prioritize, bind).",
        query(
            f"sum by (verb) (rate(gpushare_scheduler_request_duration_seconds_count[{RATE}]))",
            "{{verb}}",
        ),
        unit="reqps",
        width=8,
    )
    board.timeseries(
        "Filter latency",
        "Time to answer one filter call over all candidate nodes: 50th and 99th percentile.",
        query(_quantile(0.5, "filter"), "p50"),
        query(_quantile(0.99, "filter"), "p99"),
        unit="s",
        width=8,
    )
    board.timeseries(
        "Bind latency",
        "Time to answer one bind call, the Binding's round trip to the apiserver included.",
        query(_quantile(0.5, "bind"), "p50"),
        query(_quantile(0.99, "bind"), "p99"),
        unit="s",
        width=8,
    )

    board.row("Decisions")
    board.timeseries(
        "Binds, by result",
        "bound: the pod got its card. no-fit and conflict: the card filled up meanwhile (the "
        "pod is retried). api-error, bad-request: see the extender's log and the pod's Events.",
        query(f"sum by (result) (rate(gpushare_scheduler_binds_total[{RATE}]))", "{{result}}"),
        unit="ops",
        width=8,
    )
    board.timeseries(
        "Nodes filtered out, by reason",
        "Why nodes did not pass the filter: no card with room, a stale agent heartbeat, no or a "
        "bad node report, a request larger than any card...",
        query(
            f"sum by (reason) (rate(gpushare_scheduler_filter_failures_total[{RATE}]))",
            "{{reason}}",
        ),
        unit="ops",
        width=8,
    )
    board.timeseries(
        "Malformed calls",
        "Calls refused as malformed (HTTP 400), by verb: a kube-scheduler version the extender "
        "does not understand, or a misconfigured extender entry.",
        query(
            f"sum by (verb) (rate(gpushare_scheduler_bad_requests_total[{RATE}]))",
            "{{verb}}",
        ),
        unit="reqps",
        width=8,
    )

    board.row("Ledger")
    board.timeseries(
        "Granted against capacity",
        "What the ledger holds as granted, the cards' CUDA-visible capacity, and the room left.",
        query("sum(max by (node, card) (gpushare_scheduler_card_capacity_bytes))", "capacity"),
        query("sum(max by (node, card) (gpushare_scheduler_card_granted_bytes))", "granted"),
        query("sum(max by (node, card) (gpushare_scheduler_card_room_bytes))", "room"),
        unit="bytes",
        width=8,
    )
    board.timeseries(
        "Nodes, by state",
        "ready; stale-heartbeat (the agent went silent); no-report; bad-report.",
        query("max by (state) (gpushare_scheduler_nodes)", "{{state}}"),
        width=8,
    )
    board.timeseries(
        "Pods holding memory, and watch restarts",
        "Pods with a grant in the ledger; watches restarted (expired: 410 Gone, then a re-list).",
        query("max(gpushare_scheduler_pods_granted)", "pods granted"),
        query(
            f"sum by (resource, cause) (increase(gpushare_scheduler_watch_restarts_total[{RATE}]))",
            "restarts {{resource}} {{cause}}",
        ),
        width=8,
    )
    return board.build()
