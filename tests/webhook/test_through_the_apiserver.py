"""The webhook behind the real kube-apiserver: configurations from manifests/, objects by kubectl.

The apiserver evaluates the matchConditions (CEL), the namespaceSelector and the failure policy,
applies our JSON patch, re-invokes the webhook after a later mutator and validates the result.
"""

import base64
import contextlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpushare.core import names
from gpushare.webhook import paths
from tests import cluster
from tests.webhook import builders
from tests.webhook.conftest import report_card
from tests.webhook.process import Webhook

pytestmark = pytest.mark.cluster

DENIED = 'admission webhook "inferenceservices.gpushare.io" denied the request'
OURS = names.VLLM_UTILIZATION_ARG


def create(
    cp: cluster.ControlPlane, namespace: str, body: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Create ``body`` with kubectl; return the stored object and kubectl's warnings."""
    metadata = {k: v for k, v in body["metadata"].items() if k != "namespace"}
    text = json.dumps({**body, "metadata": metadata})
    result = cp.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=text)
    stored: dict[str, Any] = json.loads(result.stdout)
    return stored, result.stderr


def apply_isvc(cp: cluster.ControlPlane, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
    body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    return cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), **kw)


def test_annotated_inference_services_are_accepted_and_stored(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    bodies = [builders.isvc(fixture) for fixture in builders.FIXTURES]
    bodies[1]["metadata"]["name"] = "bloom-openai"
    bodies.append(builders.model_isvc("bloom-runtime", model_format="vLLM", args=["--dtype=half"]))
    before = registered.requests_total(paths.VALIDATE_INFERENCE_SERVICES)
    for body in bodies:
        result = apply_isvc(control_plane, namespace, body)
        if registered.metrics().get(("gpushare_webhook_reporting_nodes", ()), 0) == 0:
            assert "Warning: gpushare: no GPU node has reported its cards yet" in result.stderr
        stored = json.loads(
            control_plane.kubectl(
                "get", "inferenceservice", body["metadata"]["name"], "-n", namespace, "-o", "json"
            ).stdout
        )
        assert stored["metadata"]["annotations"][names.ANNOTATION_GPU_MEMORY] == "20Gi"
        assert stored["spec"]["predictor"] == body["spec"]["predictor"]
    assert registered.requests_total(paths.VALIDATE_INFERENCE_SERVICES) == before + len(bodies)


def _edit_container(edit: Any) -> dict[str, Any]:
    body = builders.isvc("isvc-vllm-openai.yaml")
    edit(body["spec"]["predictor"]["containers"][0])
    return body


BAD = [
    (
        "words",
        builders.isvc("isvc-vllm-openai.yaml", memory="twenty"),
        "is not a Kubernetes quantity",
    ),
    ("zero", builders.isvc("isvc-vllm-openai.yaml", memory="0"), "asks for no memory"),
    (
        "reserve",
        builders.isvc("isvc-vllm-openai.yaml", memory="256Mi"),
        "does not exceed the per-instance reserve",
    ),
    (
        "near miss only",
        builders.isvc("isvc-vllm-openai.yaml", memory=None, **{"gpushare.io/gpu_memory": "20Gi"}),
        "did you mean gpushare.io/gpu-memory?",
    ),
    (
        "two GPUs",
        _edit_container(lambda c: c["resources"]["limits"].update({"nvidia.com/gpu": "2"})),
        "asks for 2 GPUs",
    ),
    (
        "tensor parallel",
        _edit_container(lambda c: c["args"].extend(["--tensor-parallel-size", "2"])),
        "not supported",
    ),
    (
        "system env",
        _edit_container(
            lambda c: c["env"].append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
        ),
        "sets NVIDIA_VISIBLE_DEVICES, which gpushare sets",
    ),
]


@pytest.mark.parametrize(("body", "says"), [(b, s) for _, b, s in BAD], ids=[i for i, _, _ in BAD])
def test_bad_inference_services_are_refused_and_kubectl_shows_why(
    control_plane: cluster.ControlPlane,
    registered: Webhook,
    namespace: str,
    body: dict[str, Any],
    says: str,
) -> None:
    result = apply_isvc(control_plane, namespace, body, check=False)
    assert result.returncode != 0
    assert DENIED in result.stderr and says in result.stderr, result.stderr
    missing = control_plane.kubectl("get", "inferenceservice", "-n", namespace, "-o", "name")
    assert missing.stdout.strip() == ""


def test_a_request_larger_than_any_grant_a_card_can_hold_is_refused(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    # NVML says 80 GiB, CUDA sees 79.53 GiB, and the grant's own MPS server needs 66 MiB of it:
    # 79 units of 1 GiB is the most a pod can get there.
    card = cluster.gpu_card(total="80Gi", reserved="480Mi")
    report_card(control_plane, registered, namespace, card)
    result = apply_isvc(
        control_plane,
        namespace,
        builders.isvc("isvc-vllm-openai.yaml", memory="79.5Gi"),
        check=False,
    )
    assert DENIED in result.stderr
    assert "is more than the largest grant possible, 79 GiB" in result.stderr
    assert "ask for at most '79Gi'" in result.stderr


def pods_to_create() -> list[tuple[str, dict[str, Any], str]]:
    vllm_runtime = builders.load("kserve", "kserve-vllmserver.yaml")
    hf_runtime = builders.load("kserve", "kserve-huggingfaceserver.yaml")
    hf = builders.model_isvc("qwen", model_format="huggingface", args=["--backend=vllm"])
    return [
        ("api_server", builders.predictor_pod(builders.isvc("isvc-vllm-api-server.yaml")), "20"),
        ("vllm-openai", builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml")), "20"),
        (
            "vllmserver runtime",
            builders.predictor_pod(
                builders.model_isvc("b", model_format="vLLM", args=[]), vllm_runtime
            ),
            "20",
        ),
        ("huggingface runtime", builders.predictor_pod(hf, hf_runtime), "20"),
        ("deployment", builders.pod_of(builders.deployment()), "16"),
        ("job", builders.job_pod(), "12"),
    ]


@pytest.mark.parametrize(
    ("pod", "units"),
    [(p, u) for _, p, u in pods_to_create()],
    ids=[i for i, _, _ in pods_to_create()],
)
def test_pods_come_back_stored_in_the_mutated_form(
    control_plane: cluster.ControlPlane,
    registered: Webhook,
    namespace: str,
    pod: dict[str, Any],
    units: str,
) -> None:
    stored, warnings = create(control_plane, namespace, pod)
    containers = stored["spec"]["containers"]
    holder = next(
        c for c in containers if names.RESOURCE_GPU_MEMORY in c["resources"].get("limits", {})
    )
    assert holder["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == units
    assert holder["resources"]["requests"][names.RESOURCE_GPU_MEMORY] == units
    assert all(
        names.NVIDIA_GPU_RESOURCE not in c["resources"].get("limits", {}) for c in containers
    )
    assert stored["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert stored["metadata"]["annotations"][names.ANNOTATION_MUTATED] == units
    argv = (holder.get("command") or []) + (holder.get("args") or [])
    if holder["name"] == "trainer":
        assert OURS not in argv
    else:
        assert argv[-1] == OURS
    assert "Warning: gpushare: container" in warnings


def test_an_inference_service_with_a_transformer_shares_only_its_predictor(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    isvc = builders.with_transformer(builders.isvc("isvc-vllm-openai.yaml"))
    isvc["metadata"]["name"] = "with-transformer"
    applied = apply_isvc(control_plane, namespace, isvc)
    assert "to the transformer's pods too" in applied.stderr, applied.stderr
    stored_isvc = json.loads(
        control_plane.kubectl(
            "get", "inferenceservice", "with-transformer", "-n", namespace, "-o", "json"
        ).stdout
    )
    # The pods KServe's controller makes of the stored object, created as it creates them.
    predictor, _ = create(control_plane, namespace, builders.predictor_pod(stored_isvc))
    transformer_pod = builders.transformer_pod(stored_isvc)
    transformer, warnings = create(control_plane, namespace, transformer_pod)
    server = predictor["spec"]["containers"][0]
    assert server["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == "20"
    assert server["args"][-1] == OURS
    assert predictor["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert transformer["spec"]["schedulerName"] == "default-scheduler"
    assert names.ANNOTATION_MUTATED not in transformer["metadata"]["annotations"]
    written = transformer_pod["spec"]["containers"][0]
    kept = transformer["spec"]["containers"][0]
    assert kept["args"] == written["args"] and kept["resources"] == written["resources"]
    assert "no container requests nvidia.com/gpu: the pod is left unchanged" in warnings


def test_near_misses_reach_the_webhook_and_are_refused(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    pod = builders.job_pod()
    pod["metadata"]["annotations"] = {"gpushare.io/gpu_memory": "12Gi"}
    refused = control_plane.kubectl(
        "create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
    )
    assert refused.returncode != 0
    assert "did you mean gpushare.io/gpu-memory?" in refused.stderr, refused.stderr
    isvc = builders.isvc("isvc-vllm-openai.yaml", memory=None)
    isvc["spec"]["predictor"]["annotations"] = {names.ANNOTATION_GPU_MEMORY: "0"}
    result = apply_isvc(control_plane, namespace, isvc, check=False)
    assert DENIED in result.stderr and "asks for no memory" in result.stderr, result.stderr


def test_a_deployment_with_the_annotation_is_stored_as_written(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    stored, _ = create(control_plane, namespace, builders.deployment())
    server = stored["spec"]["template"]["spec"]["containers"][0]
    assert server["resources"]["limits"] == {names.NVIDIA_GPU_RESOURCE: "1"}  # only pods change


def test_pods_without_the_annotation_never_reach_the_webhook(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    pod = builders.job_pod()
    del pod["metadata"]["annotations"]
    before = registered.requests_total(paths.MUTATE_PODS)
    stored, _ = create(control_plane, namespace, pod)
    assert stored["spec"]["schedulerName"] == "default-scheduler"
    assert stored["spec"]["containers"][0]["resources"]["limits"] == {
        names.NVIDIA_GPU_RESOURCE: "1"
    }
    assert registered.requests_total(paths.MUTATE_PODS) == before


def test_system_namespaces_are_left_alone(
    control_plane: cluster.ControlPlane, registered: Webhook
) -> None:
    before = registered.requests_total(paths.MUTATE_PODS)
    pod = builders.job_pod()
    pod["metadata"]["name"] = cluster.unique_name("system-probe")
    stored, _ = create(control_plane, "kube-system", pod)
    try:
        assert stored["spec"]["schedulerName"] == "default-scheduler"
        assert registered.requests_total(paths.MUTATE_PODS) == before
    finally:
        control_plane.kubectl(
            "delete",
            "pod",
            pod["metadata"]["name"],
            "-n",
            "kube-system",
            "--grace-period=0",
            "--force",
        )


TOUCHED = "tests.gpushare.io/touched"


class _Touch(http.server.BaseHTTPRequestHandler):
    """A later mutating webhook (as KServe's pod mutator is): adds one annotation if absent."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        answer: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        annotations = request["object"]["metadata"].get("annotations")
        if annotations is None:
            patch = [{"op": "add", "path": "/metadata/annotations", "value": {TOUCHED: "yes"}}]
        elif TOUCHED not in annotations:
            patch = [
                {
                    "op": "add",
                    "path": "/metadata/annotations/" + TOUCHED.replace("/", "~1"),
                    "value": "yes",
                }
            ]
        else:
            patch = []
        if patch:
            answer.update(
                patchType="JSONPatch", patch=base64.b64encode(json.dumps(patch).encode()).decode()
            )
        data = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def later_mutator(cp: cluster.ControlPlane, pair: Path) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Touch)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair / "tls.crt", pair / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "zz-later-mutator"},  # sorts after gpushare-webhook: called after it
        "webhooks": [
            {
                "name": "touch.tests.gpushare.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                    }
                ],
                "objectSelector": {"matchLabels": {"tests.gpushare.io/touch": "yes"}},
                "clientConfig": {
                    "url": f"https://127.0.0.1:{server.server_address[1]}/",
                    "caBundle": base64.b64encode((pair / "ca.crt").read_bytes()).decode(),
                },
            }
        ],
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        yield
    finally:
        cp.kubectl(
            "delete", "mutatingwebhookconfiguration", "zz-later-mutator", "--ignore-not-found"
        )
        server.shutdown()


def test_the_apiserver_reinvokes_us_after_a_later_mutator_and_we_change_nothing(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    pod["metadata"]["labels"]["tests.gpushare.io/touch"] = "yes"
    with later_mutator(control_plane, registered.pair):
        probe = {**pod, "metadata": {**pod["metadata"], "annotations": {}}}
        cluster.wait_for(
            lambda: (
                TOUCHED
                in create(control_plane, namespace, probe)[0]["metadata"].get("annotations", {})
            ),
            what="the later mutator to be called",
        )
        before = registered.metrics()
        stored, _ = create(control_plane, namespace, pod)
        after = registered.metrics()
    assert stored["metadata"]["annotations"][TOUCHED] == "yes"
    assert stored["spec"]["containers"][0]["args"][-1] == OURS

    def delta(outcome: str) -> float:
        key = (
            "gpushare_webhook_requests_total",
            (("operation", "CREATE"), ("outcome", outcome), ("webhook", paths.MUTATE_PODS)),
        )
        return after.get(key, 0) - before.get(key, 0)

    assert delta("mutated") == 1  # the first call
    assert delta("allowed") == 1  # the re-invocation: an empty patch


def test_while_the_webhook_is_down(
    control_plane: cluster.ControlPlane, registered: Webhook, namespace: str
) -> None:
    registered.stop()
    try:
        plain = builders.job_pod()
        del plain["metadata"]["annotations"]
        stored, _ = create(control_plane, namespace, plain)
        assert stored["metadata"]["name"]
        isvc = builders.isvc("isvc-vllm-openai.yaml", memory=None)
        assert apply_isvc(control_plane, namespace, isvc).returncode == 0

        annotated = control_plane.kubectl(
            "create", "-n", namespace, "-f", "-", input=json.dumps(builders.job_pod()), check=False
        )
        assert annotated.returncode != 0
        assert 'failed calling webhook "pods.gpushare.io"' in annotated.stderr, annotated.stderr
        refused = apply_isvc(
            control_plane,
            namespace,
            {
                **builders.isvc("isvc-vllm-openai.yaml"),
                "metadata": {"name": "other", "annotations": {names.ANNOTATION_GPU_MEMORY: "20Gi"}},
            },
            check=False,
        )
        assert 'failed calling webhook "inferenceservices.gpushare.io"' in refused.stderr
    finally:
        registered.start()
