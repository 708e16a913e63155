"""Per InferenceService: memory used against the grant, and vLLM's own view of its KV cache.

KServe names a predictor's pods ``<inferenceservice>-predictor-<hash>``, so the InferenceService
variable is taken from the pod label of gpushare's per-container series. vLLM's series carry the
``namespace`` and ``pod`` labels that Prometheus's Kubernetes discovery adds (docs/install.md).
"""

from grafana_foundation_sdk.models import dashboard as models

from dashboards.common import RATE, Board, label_variable, query

UID = "gpushare-inferenceservices"

POD = 'namespace=~"$namespace", pod=~"($isvc)-predictor-.*"'
BY_POD = "{{namespace}}/{{pod}}"


def build() -> models.Dashboard:
    board = (
        Board(
            UID,
            "gpushare / InferenceServices",
            "Each InferenceService's memory against its grant, and vLLM's KV cache and queue.",
        )
        .variable(
            label_variable(
                "namespace",
                "Namespace",
                "label_values(gpushare_container_granted_bytes, namespace)",
            )
        )
        .variable(
            label_variable(
                "isvc",
                "InferenceService",
                'label_values(gpushare_container_granted_bytes{namespace=~"$namespace"}, pod)',
                regex="/^(.+)-predictor-.*$/",
            )
        )
    )

    board.row("Memory")
    board.timeseries(
        "Used against granted",
        "Each serving pod's GPU memory in use (solid) and its grant.",
        query(
            f"sum by (namespace, pod) (gpushare_container_used_bytes{{{POD}}})", f"{BY_POD} used"
        ),
        query(
            f"sum by (namespace, pod) (gpushare_container_granted_bytes{{{POD}}})",
            f"{BY_POD} granted",
        ),
        unit="bytes",
    )
    board.timeseries(
        "Share of the grant in use",
        "Used over granted. vLLM takes its whole budget at start-up (weights, activations, KV "
        "cache), so a healthy server sits just under 100%; above it, the watchdog steps in.",
        query(
            f"sum by (namespace, pod) (gpushare_container_used_bytes{{{POD}}})"
            f" / sum by (namespace, pod) (gpushare_container_granted_bytes{{{POD}}})",
            BY_POD,
        ),
        unit="percentunit",
    )

    board.row("vLLM")
    board.timeseries(
        "KV cache usage",
        "vLLM's vllm:kv_cache_usage_perc: the share of its KV cache blocks in use.",
        query(f"max by (namespace, pod) (vllm:kv_cache_usage_perc{{{POD}}})", BY_POD),
        unit="percentunit",
        width=8,
    )
    board.timeseries(
        "Requests running",
        "vLLM's vllm:num_requests_running: requests in the running batch.",
        query(f"sum by (namespace, pod) (vllm:num_requests_running{{{POD}}})", BY_POD),
        width=8,
    )
    board.timeseries(
        "Requests waiting",
        "vLLM's vllm:num_requests_waiting: requests queued for lack of KV cache or batch room.",
        query(f"sum by (namespace, pod) (vllm:num_requests_waiting{{{POD}}})", BY_POD),
        width=8,
    )
    board.table(
        "vLLM memory settings",
        "vllm:cache_config_info: the --gpu-memory-utilization each server runs with (set from "
        "its grant by the device plugin) and its KV cache size.",
        query(
            f"max by (namespace, pod, gpu_memory_utilization, num_gpu_blocks, block_size)"
            f" (vllm:cache_config_info{{{POD}}})",
            instant=True,
        ),
        query(f"sum by (namespace, pod) (gpushare_container_granted_bytes{{{POD}}})", instant=True),
        columns=("info", "granted"),
        column_units={"granted": "bytes"},
    )

    board.row("Enforcement")
    board.timeseries(
        "Over-grant events",
        "Times the watchdog found a container of this InferenceService over its grant.",
        query(
            f"sum by (namespace, pod, container)"
            f" (increase(gpushare_grant_violations_total{{{POD}}}[{RATE}]))",
            "{{namespace}}/{{pod}}/{{container}}",
        ),
        width=24,
    )
    return board.build()
