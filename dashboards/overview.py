"""Cluster overview: every shared card's memory, who holds it, and the GPUs sharing saves."""

from grafana_foundation_sdk.models import dashboard as models

from dashboards.common import RATE, Board, label_variable, query

UID = "gpushare-overview"

NODE = 'node=~"$node"'


def build() -> models.Dashboard:
    board = Board(
        UID,
        "gpushare / Cluster overview",
        "Shared GPUs across the cluster: memory granted, used and free, and what sharing saves.",
    ).variable(label_variable("node", "Node", "label_values(gpushare_card_total_bytes, node)"))

    board.row("Fleet")
    board.stat(
        "Shared cards",
        "Cards reported by the device plugins.",
        query(f"count(gpushare_card_total_bytes{{{NODE}}})"),
    )
    board.stat(
        "Memory",
        "Total memory of the shared cards.",
        query(f"sum(gpushare_card_total_bytes{{{NODE}}})"),
        unit="bytes",
    )
    board.stat(
        "Granted",
        "Memory granted to containers (the scheduler's ledger, per card).",
        query(f"sum(gpushare_card_granted_bytes{{{NODE}}})"),
        unit="bytes",
    )
    board.stat(
        "Used",
        "Memory in use on the cards, as NVML reports it.",
        query(f"sum(gpushare_card_used_bytes{{{NODE}}})"),
        unit="bytes",
    )
    board.stat(
        "Free",
        "Memory free on the cards, as NVML reports it.",
        query(f"sum(gpushare_card_free_bytes{{{NODE}}})"),
        unit="bytes",
    )
    board.stat(
        "GPUs saved",
        "Serving containers minus the cards they occupy: the cards that one model per GPU would "
        "need on top of these.",
        query(
            f"count(gpushare_container_granted_bytes{{{NODE}}})"
            f" - count(count by (node, gpu_uuid) (gpushare_container_granted_bytes{{{NODE}}}))"
        ),
    )

    board.row("Memory over time")
    board.timeseries(
        "Cluster memory",
        "Granted is what the scheduler promised; used is what the processes hold.",
        query(f"sum(gpushare_card_total_bytes{{{NODE}}})", "total"),
        query(f"sum(gpushare_card_granted_bytes{{{NODE}}})", "granted"),
        query(f"sum(gpushare_card_used_bytes{{{NODE}}})", "used"),
        query(f"sum(gpushare_card_free_bytes{{{NODE}}})", "free"),
        unit="bytes",
    )
    board.timeseries(
        "Granted and used share of capacity",
        "Granted over total, and used over total, across the shared cards.",
        query(
            f"sum(gpushare_card_granted_bytes{{{NODE}}})"
            f" / sum(gpushare_card_total_bytes{{{NODE}}})",
            "granted",
        ),
        query(
            f"sum(gpushare_card_used_bytes{{{NODE}}}) / sum(gpushare_card_total_bytes{{{NODE}}})",
            "used",
        ),
        unit="percentunit",
    )

    board.row("Cards")
    board.timeseries(
        "Serving containers per card",
        "How many containers hold a grant on each card.",
        query(
            f"count by (node, gpu_uuid) (gpushare_container_granted_bytes{{{NODE}}})",
            "{{node}} {{gpu_uuid}}",
        ),
        width=12,
    )
    board.timeseries(
        "Containers over their grant",
        "Over-grant events the device plugins' watchdogs raised.",
        query(
            f"sum by (node) (increase(gpushare_grant_violations_total{{{NODE}}}[{RATE}]))",
            "{{node}}",
        ),
        width=12,
    )
    board.table(
        "Cards",
        "Every shared card now: total, granted, used and free memory.",
        query(
            f"max by (node, gpu_index, model) (gpushare_card_total_bytes{{{NODE}}})", instant=True
        ),
        query(
            f"max by (node, gpu_index, model) (gpushare_card_granted_bytes{{{NODE}}})", instant=True
        ),
        query(
            f"max by (node, gpu_index, model) (gpushare_card_used_bytes{{{NODE}}})", instant=True
        ),
        query(
            f"max by (node, gpu_index, model) (gpushare_card_free_bytes{{{NODE}}})", instant=True
        ),
        columns=("total", "granted", "used", "free"),
        unit="bytes",
    )
    return board.build()
