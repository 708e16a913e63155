"""The webhook process over HTTPS on the pod shapes KServe and people write, and on the requests
an apiserver may send that the configurations do not ask for."""

import base64
import json
import re
import uuid
from typing import Any

import pytest

from gpushare.core import names
from gpushare.webhook import paths
from tests.webhook import builders, strategies
from tests.webhook.process import Webhook
from tests.webhook.test_admission_over_https import ISVC, answer, patched

OURS = names.VLLM_UTILIZATION_ARG
MIB = 1024**2


def mutate(webhook: Webhook, pod: dict[str, Any], **review: Any) -> dict[str, Any]:
    request = strategies.review(pod, **review)
    return answer(webhook.review(paths.MUTATE_PODS, request), request)


def validate(webhook: Webhook, isvc: dict[str, Any], **review: Any) -> dict[str, Any]:
    request = strategies.review(isvc, resource=ISVC, **review)
    return answer(webhook.review(paths.VALIDATE_INFERENCE_SERVICES, request), request)


def _argv(container: dict[str, Any]) -> list[str]:
    return [*(container.get("command") or []), *(container.get("args") or [])]


def test_a_transformer_is_left_alone_and_its_predictor_is_shared(webhook: Webhook) -> None:
    isvc = builders.with_transformer(builders.isvc("isvc-vllm-openai.yaml"))
    transformer = mutate(webhook, builders.transformer_pod(isvc))
    assert transformer["allowed"] and "patch" not in transformer
    assert any("no container requests nvidia.com/gpu" in w for w in transformer["warnings"])
    predictor = builders.predictor_pod(isvc)
    server = patched(predictor, mutate(webhook, predictor))["spec"]["containers"][0]
    assert _argv(server)[-1] == OURS
    verdict = validate(webhook, isvc)
    assert verdict["allowed"]
    assert any("to the transformer's pods too" in w for w in verdict["warnings"])


def test_a_tgi_predictor_gets_the_grant_a_warning_and_no_vllm_flag(webhook: Webhook) -> None:
    pod = builders.predictor_pod(builders.tgi_isvc())
    payload = mutate(webhook, pod)
    server = patched(pod, payload)["spec"]["containers"][0]
    assert server["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == "20"
    assert OURS not in _argv(server)
    assert any("sees no vLLM server" in w for w in payload["warnings"])


@pytest.mark.parametrize("command", list(builders.WRAPPED.values()), ids=list(builders.WRAPPED))
def test_vllm_behind_a_wrapper_is_sized(webhook: Webhook, command: list[str]) -> None:
    pod = builders.predictor_pod(builders.wrapped_isvc(command))
    argv = _argv(patched(pod, mutate(webhook, pod))["spec"]["containers"][0])
    assert sum(OURS in token for token in argv) == 1 and argv[-1].endswith(OURS)


def test_a_split_flag_goes_with_its_value(webhook: Webhook) -> None:
    pod = builders.predictor_pod(builders.split_flag_isvc())
    server = patched(pod, mutate(webhook, pod))["spec"]["containers"][0]
    assert server["command"] == ["vllm", "serve", "/mnt/models"]
    assert server["args"] == ["--port", "8080", OURS]


def test_a_readiness_sidecar_is_no_vllm_server(webhook: Webhook) -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    script = "until curl -sf localhost:8080/health; do sleep 2; done; echo 'vllm serve is up'"
    pod["spec"]["containers"].append(
        {"name": "ready", "image": "curlimages/curl:8.11.0", "command": ["sh", "-c", script]}
    )
    payload = mutate(webhook, pod)
    assert payload["allowed"], payload
    assert patched(pod, payload)["spec"]["containers"][1] == pod["spec"]["containers"][1]


def test_two_vllm_containers_without_a_gpu_are_told_the_truth(webhook: Webhook) -> None:
    pod = builders.pod_of(builders.deployment())
    del pod["spec"]["containers"][0]["resources"]
    pod["spec"]["containers"][1] = {"name": "second", "image": "vllm/vllm-openai:v0.24.0"}
    payload = mutate(webhook, pod)
    assert payload["allowed"] and "patch" not in payload
    assert any("server, second run vLLM and none requests" in w for w in payload["warnings"])


def test_a_hand_set_grant_is_replaced_and_the_warning_says_so(webhook: Webhook) -> None:
    pod = builders.job_pod()
    pod["spec"]["containers"][0]["resources"]["limits"][names.RESOURCE_GPU_MEMORY] = "4"
    payload = mutate(webhook, pod)
    assert patched(pod, payload)["spec"]["containers"][0]["resources"]["limits"] == {
        names.RESOURCE_GPU_MEMORY: "12"
    }
    assert any("is replaced by 12: the annotation" in w for w in payload["warnings"])


def _server(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _kserve_pod() -> dict[str, Any]:
    return builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))


def _edited(edit: Any) -> dict[str, Any]:
    pod = _kserve_pod()
    edit(pod)
    return pod


POD_REFUSALS = [
    (
        "kv cache",
        _edited(lambda p: _server(p)["args"].append("--kv-cache-memory-bytes=8G")),
        "--kv-cache-memory-bytes",
    ),
    (
        "MIG slice",
        _edited(
            lambda p: _server(p)["resources"]["limits"].update({"nvidia.com/mig-1g.10gb": "1"})
        ),
        "nvidia.com/mig-1g.10gb",
    ),
    (
        "time-shared GPU",
        _edited(lambda p: _server(p)["resources"]["limits"].update({"nvidia.com/gpu.shared": "1"})),
        "nvidia.com/gpu.shared",
    ),
    (
        "allocations preset",
        _edited(
            lambda p: p["metadata"]["annotations"].update({names.ANNOTATION_ALLOCATIONS: "[]"})
        ),
        "is a system annotation",
    ),
    (
        "typo key",
        _edited(lambda p: p["metadata"]["annotations"].update({"gpushare.io/polcy": "spread"})),
        "did you mean gpushare.io/policy?",
    ),
    (
        "MPS variable from a ConfigMap",
        _edited(
            lambda p: _server(p)["env"].append(
                {
                    "name": "CUDA_MPS_PIPE_DIRECTORY",
                    "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}},
                }
            )
        ),
        "sets CUDA_MPS_PIPE_DIRECTORY",
    ),
    (
        "envFrom with a gpushare prefix",
        _edited(lambda p: _server(p).update(envFrom=[{"prefix": "GPUSHARE_", "secretRef": {}}])),
        "prefix 'GPUSHARE_'",
    ),
    (
        "Arabic-Indic digits",
        _edited(
            lambda p: p["metadata"]["annotations"].update({names.ANNOTATION_GPU_MEMORY: "٢٠Gi"})
        ),
        "is not a Kubernetes quantity",
    ),
    (
        "fullwidth digits",
        _edited(
            lambda p: p["metadata"]["annotations"].update({names.ANNOTATION_GPU_MEMORY: "２０Gi"})
        ),
        "is not a Kubernetes quantity",
    ),
    (
        "beyond int64",
        _edited(
            lambda p: p["metadata"]["annotations"].update({names.ANNOTATION_GPU_MEMORY: "1e30"})
        ),
        "more than the largest grant possible",
    ),
    (
        "an env name that is a list",
        _edited(lambda p: _server(p).update(env=[{"name": ["A"], "value": "x"}])),
        "the pod is malformed: spec.containers[0]: env[0]",
    ),
]


@pytest.mark.parametrize(
    ("pod", "says"), [(p, s) for _, p, s in POD_REFUSALS], ids=[i for i, _, _ in POD_REFUSALS]
)
def test_pods_that_would_escape_or_confuse_the_grant_are_refused(
    webhook: Webhook, pod: dict[str, Any], says: str
) -> None:
    payload = mutate(webhook, pod)
    assert payload["allowed"] is False and "patch" not in payload
    assert payload["status"]["code"] == 403
    assert says in payload["status"]["message"], payload["status"]["message"]


def test_predictor_annotations_are_validated_like_the_services(webhook: Webhook) -> None:
    isvc = builders.isvc("isvc-vllm-openai.yaml", memory=None)
    isvc["spec"]["predictor"]["annotations"] = {names.ANNOTATION_GPU_MEMORY: "0"}
    payload = validate(webhook, isvc)
    assert payload["allowed"] is False
    assert "spec.predictor.annotations: gpushare.io/gpu-memory: '0'" in payload["status"]["message"]


def test_system_annotations_on_a_service_are_named_as_such(webhook: Webhook) -> None:
    isvc = builders.isvc("isvc-vllm-openai.yaml", **{names.ANNOTATION_ALLOCATIONS: "[]"})
    payload = validate(webhook, isvc)
    assert "gpushare.io/allocations is a system annotation" in payload["status"]["message"]


def test_a_pod_as_large_as_etcd_takes_is_admitted(webhook: Webhook) -> None:
    pod = _kserve_pod()
    pod["metadata"]["annotations"]["example.com/blob"] = "x" * (3 * MIB // 2 - 4096)
    payload = mutate(webhook, pod)
    assert payload["allowed"] and "patch" in payload


def test_an_update_of_a_large_service_carries_two_objects_and_is_answered(
    webhook: Webhook,
) -> None:
    isvc = builders.isvc("isvc-vllm-openai.yaml")
    isvc["metadata"]["annotations"]["example.com/blob"] = "x" * (3 * MIB // 2 - 4096)
    request = strategies.review(isvc, resource=ISVC, operation="UPDATE")
    request["request"]["oldObject"] = isvc
    payload = answer(webhook.review(paths.VALIDATE_INFERENCE_SERVICES, request), request)
    assert payload["allowed"]


@pytest.mark.parametrize(
    ("path", "resource", "operation"),
    [
        (paths.MUTATE_PODS, ("", "v1", "pods"), "UPDATE"),
        (paths.MUTATE_PODS, ("", "v1", "pods"), "DELETE"),
        (paths.VALIDATE_INFERENCE_SERVICES, ISVC, "DELETE"),
        (paths.VALIDATE_INFERENCE_SERVICES, ISVC, "CONNECT"),
    ],
    ids=["pod update", "pod delete", "service delete", "service connect"],
)
def test_operations_the_configurations_do_not_send_are_allowed_untouched(
    webhook: Webhook, path: str, resource: tuple[str, str, str], operation: str
) -> None:
    # A refused body, so that a decision would show: an unknown key and a zero size.
    body = (
        builders.job_pod(memory="0")
        if resource[2] == "pods"
        else builders.isvc("isvc-vllm-openai.yaml", memory="0")
    )
    request = strategies.review(body, resource=resource, operation=operation)
    if operation == "DELETE":
        request["request"]["object"], request["request"]["oldObject"] = None, body
    else:
        request["request"]["oldObject"] = body
    payload = answer(webhook.review(path, request), request)
    assert payload == {"uid": request["request"]["uid"], "allowed": True}


def test_a_refusal_is_logged_once_at_info_with_newlines_escaped(webhook: Webhook) -> None:
    name = f"forged-{uuid.uuid4().hex[:8]}"
    pod = builders.job_pod()
    pod["metadata"]["name"] = name
    pod["spec"]["containers"][0]["name"] = "trainer\nERROR forged line"
    pod["spec"]["containers"][0]["env"] = [{"name": "CUDA_MPS_PIPE_DIRECTORY", "value": "/x"}]
    payload = mutate(webhook, pod)
    assert payload["allowed"] is False
    log = webhook.log_path.read_text()
    lines = [line for line in log.splitlines() if name in line]
    assert len(lines) == 1, lines
    assert re.search(r" INFO gpushare\.webhook\.handlers: /mutate-pods \S+ refused: ", lines[0])
    assert "trainer\\nERROR forged line" in lines[0]
    assert not any(line.startswith("ERROR forged line") for line in log.splitlines())
    assert "failed permanently" not in log


def test_a_patch_is_plain_json_patch(webhook: Webhook) -> None:
    payload = mutate(webhook, _kserve_pod())
    assert payload["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(payload["patch"]))
    assert {op["op"] for op in ops} == {"add"}
