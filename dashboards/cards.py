"""Per node and per card: granted against used against free over time, and who holds what."""

from grafana_foundation_sdk.models import dashboard as models

from dashboards.common import RATE, Board, label_variable, query

UID = "gpushare-cards"

CARD = 'node=~"$node", gpu_uuid=~"$card"'
LEGEND = "{{node}} GPU {{gpu_index}}"


def build() -> models.Dashboard:
    board = (
        Board(
            UID,
            "gpushare / Nodes and cards",
            "Each shared card over time: memory granted, used and free, and the containers on it.",
        )
        .variable(label_variable("node", "Node", "label_values(gpushare_card_total_bytes, node)"))
        .variable(
            label_variable(
                "card",
                "Card",
                'label_values(gpushare_card_total_bytes{node=~"$node"}, gpu_uuid)',
            )
        )
    )

    board.row("Memory")
    board.timeseries(
        "Granted",
        "Memory the scheduler granted on each card.",
        query(f"gpushare_card_granted_bytes{{{CARD}}}", LEGEND),
        unit="bytes",
        width=8,
    )
    board.timeseries(
        "Used",
        "Memory in use on each card (NVML), whoever holds it.",
        query(f"gpushare_card_used_bytes{{{CARD}}}", LEGEND),
        unit="bytes",
        width=8,
    )
    board.timeseries(
        "Free",
        "Memory free on each card (NVML).",
        query(f"gpushare_card_free_bytes{{{CARD}}}", LEGEND),
        unit="bytes",
        width=8,
    )
    board.timeseries(
        "Granted, used and free, summed over the selection",
        "Granted above used means room the grants reserve but nobody uses yet; used above "
        "granted means a process outside the grants, or a container over its grant.",
        query(f"sum(gpushare_card_total_bytes{{{CARD}}})", "total"),
        query(f"sum(gpushare_card_granted_bytes{{{CARD}}})", "granted"),
        query(f"sum(gpushare_card_used_bytes{{{CARD}}})", "used"),
        query(f"sum(gpushare_card_free_bytes{{{CARD}}})", "free"),
        unit="bytes",
        width=12,
    )
    board.timeseries(
        "Granted share of each card",
        "Granted over total memory, per card.",
        query(
            f"gpushare_card_granted_bytes{{{CARD}}} / gpushare_card_total_bytes{{{CARD}}}",
            LEGEND,
        ),
        unit="percentunit",
        width=12,
    )

    board.row("Containers on the cards")
    board.timeseries(
        "Memory used by container",
        "What each container's processes hold on its card, stacked per card.",
        query(
            f"sum by (node, gpu_uuid, namespace, pod, container)"
            f" (gpushare_container_used_bytes{{{CARD}}})",
            "{{namespace}}/{{pod}}/{{container}} on {{node}} {{gpu_uuid}}",
        ),
        unit="bytes",
        stacked=True,
    )
    board.timeseries(
        "Memory granted by container",
        "Each container's grant, stacked per card.",
        query(
            f"sum by (node, gpu_uuid, namespace, pod, container)"
            f" (gpushare_container_granted_bytes{{{CARD}}})",
            "{{namespace}}/{{pod}}/{{container}} on {{node}} {{gpu_uuid}}",
        ),
        unit="bytes",
        stacked=True,
    )

    board.row("Isolation")
    board.table(
        "Isolation per node",
        "How each node holds containers to their grants: cgroup (the driver's per-cgroup limit, "
        "drivers r615+), mps (a daemon per container), mps-shared (one per node) or none; "
        "isolation auto picks the strongest the node supports. Cards whose driver has per-cgroup "
        "limits, of all cards.",
        query('max by (node, isolation) (gpushare_node_isolation{node=~"$node"})', instant=True),
        query(
            f"sum by (node) (gpushare_card_memory_limits_supported{{{CARD}}})",
            instant=True,
        ),
        query(f"count by (node) (gpushare_card_total_bytes{{{CARD}}})", instant=True),
        columns=("running", "cards with cgroup limits", "cards"),
        width=12,
    )
    board.timeseries(
        "Escapes caught",
        "Containers caught leaving their isolation (a CUDA context outside MPS, an MPS daemon of "
        "their own, a process past its limit): each gets an Event and, by default, an eviction.",
        query(
            f"sum by (namespace, pod, container, escape)"
            f' (increase(gpushare_isolation_escapes_total{{node=~"$node"}}[{RATE}]))',
            "{{namespace}}/{{pod}}/{{container}} {{escape}}",
        ),
        width=12,
    )

    board.row("Health")
    board.timeseries(
        "Compute utilization",
        "Share of time a kernel ran on the card (NVML).",
        query(f"gpushare_card_utilization_ratio{{{CARD}}}", LEGEND),
        unit="percentunit",
        width=8,
    )
    board.timeseries(
        "Card health",
        "1 while the card is healthy; 0 when NVML reported a critical error or lost it.",
        query(f"gpushare_card_healthy{{{CARD}}}", LEGEND),
        width=8,
    )
    board.timeseries(
        "Over-grant events",
        "Containers found over their grant for longer than the grace period, on these nodes.",
        query(
            f"sum by (namespace, pod, container)"
            f' (increase(gpushare_grant_violations_total{{node=~"$node"}}[{RATE}]))',
            "{{namespace}}/{{pod}}/{{container}}",
        ),
        width=8,
    )
    return board.build()
