"""The webhook process over HTTPS: AdmissionReview in, AdmissionReview out, whatever is sent."""

import base64
import json
from typing import Any

import requests
from hypothesis import HealthCheck, given, settings

from gpushare.core import names
from gpushare.webhook import paths
from tests.webhook import builders, strategies
from tests.webhook.process import Webhook

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")


def answer(response: requests.Response, request: dict[str, Any]) -> dict[str, Any]:
    """The response payload, after checking the envelope echoes the request."""
    assert response.status_code == 200, response.text
    review = response.json()
    assert review["apiVersion"] == request["apiVersion"]
    assert review["kind"] == "AdmissionReview"
    payload: dict[str, Any] = review["response"]
    assert payload["uid"] == request["request"]["uid"]
    return payload


def patched(body: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in payload:
        return body
    assert payload["patchType"] == "JSONPatch"
    return builders.apply(body, json.loads(base64.b64decode(payload["patch"])))


def test_probes_and_metrics_answer(webhook: Webhook) -> None:
    assert requests.get(f"{webhook.probes}/healthz", timeout=5).text == "ok\n"
    assert requests.get(f"{webhook.probes}/readyz", timeout=5).status_code == 200
    text = requests.get(f"{webhook.probes}/metrics", timeout=5).text
    assert "gpushare_webhook_requests_total" in text
    assert "gpushare_webhook_largest_card_bytes" in text


def test_a_kserve_pod_is_mutated_and_a_mutated_one_is_not(webhook: Webhook) -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    request = strategies.review(pod)
    payload = answer(webhook.review(paths.MUTATE_PODS, request), request)
    assert payload["allowed"] is True
    after = patched(pod, payload)
    builders.check_pod(after)
    server = after["spec"]["containers"][0]
    assert server["args"][-1] == names.VLLM_UTILIZATION_ARG
    assert server["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == "20"
    assert any("nvidia.com/gpu replaced" in w for w in payload["warnings"])
    again = strategies.review(after)
    assert "patch" not in answer(webhook.review(paths.MUTATE_PODS, again), again)


def test_a_refusal_carries_the_reason_and_a_4xx_code(webhook: Webhook) -> None:
    request = strategies.review(builders.isvc("isvc-vllm-openai.yaml", memory="0"), resource=ISVC)
    payload = answer(webhook.review(paths.VALIDATE_INFERENCE_SERVICES, request), request)
    assert payload["allowed"] is False
    assert payload["status"]["code"] == 403
    assert "asks for no memory" in payload["status"]["message"]


def test_an_unknown_path_is_404_and_a_wrong_resource_400(webhook: Webhook) -> None:
    request = strategies.review(builders.job_pod())
    assert webhook.review("mutate-everything", request).status_code == 404
    response = webhook.review(paths.VALIDATE_INFERENCE_SERVICES, request)
    assert response.status_code == 400
    assert "admits inferenceservices" in response.text


def test_bodies_that_are_not_json_are_400(webhook: Webhook) -> None:
    for data in (b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000):
        response = webhook.post(paths.MUTATE_PODS, data=data)
        assert response.status_code == 400, (data[:10], response.status_code)


@FUZZ
@given(strategies.pods())
def test_any_valid_pod_gets_an_answer_and_a_valid_patch(
    webhook: Webhook, pod: dict[str, Any]
) -> None:
    request = strategies.review(pod)
    payload = answer(webhook.review(paths.MUTATE_PODS, request), request)
    if not payload["allowed"]:
        assert payload["status"]["code"] == 403 and payload["status"]["message"]
        assert "patch" not in payload
        return
    after = patched(pod, payload)
    builders.check_pod(after)
    again = strategies.review(after)
    assert "patch" not in answer(webhook.review(paths.MUTATE_PODS, again), again)


@FUZZ
@given(strategies.envelopes())
def test_any_envelope_gets_an_admission_review_or_a_400(webhook: Webhook, envelope: Any) -> None:
    response = webhook.review(paths.MUTATE_PODS, envelope)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.text  # the reason
        return
    payload = answer(response, envelope)
    if payload.get("status"):
        assert payload["status"]["code"] < 500, payload
    if payload["allowed"] and "patch" in payload:
        builders.check_pod(patched(envelope["request"]["object"], payload))


@FUZZ
@given(strategies.ANNOTATION_VALUES, strategies.ANNOTATION_KEYS)
def test_any_annotation_on_an_inference_service_gets_a_verdict(
    webhook: Webhook, value: str, key: str
) -> None:
    body = builders.isvc("isvc-vllm-api-server.yaml", memory=None, **{key: value})
    request = strategies.review(body, resource=ISVC)
    payload = answer(webhook.review(paths.VALIDATE_INFERENCE_SERVICES, request), request)
    assert "patch" not in payload
    if not payload["allowed"]:
        assert payload["status"]["code"] == 403 and payload["status"]["message"]
