"""The webhook with ``backend: dra`` behind the real kube-apiserver: pods are stored with the
claim, and the template they name exists in their namespace (never made by a dry run); a template
the API refuses refuses the pod."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import config, dra, names
from tests import cluster
from tests.dra import objects
from tests.webhook import builders
from tests.webhook.conftest import registration, report_card, started
from tests.webhook.process import Webhook
from tests.webhook.test_through_the_apiserver import create

pytestmark = pytest.mark.cluster

SETTINGS = config.Settings(backend="dra")


@pytest.fixture(scope="module")
def webhook(
    control_plane: cluster.ControlPlane, pair: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Webhook]:
    """The webhook process configured for the DRA backend."""
    log = tmp_path_factory.mktemp("webhook-dra") / "webhook.log"
    with started(control_plane, pair, log, {"GPUSHARE_BACKEND": "dra"}) as server:
        yield server


@pytest.fixture(scope="module")
def registered(control_plane: cluster.ControlPlane, webhook: Webhook) -> Iterator[Webhook]:
    """The manifests' webhook configurations, pointed at the DRA webhook (removed afterwards)."""
    with registration(control_plane, webhook, lambda pod: bool(pod["spec"].get("resourceClaims"))):
        yield webhook


@pytest.fixture
def reporting(control_plane: cluster.ControlPlane, registered: Webhook, namespace: str) -> None:
    """A GPU node whose report the webhook has read (it sizes vLLM for the largest card)."""
    card = cluster.gpu_card(total=objects.H100_TOTAL, reserved=objects.H100_RESERVED)
    report_card(control_plane, registered, namespace, card)


def _templates(cp: cluster.ControlPlane, namespace: str) -> list[dict[str, Any]]:
    path = f"{objects.RESOURCE}/namespaces/{namespace}/resourceclaimtemplates"
    items: list[dict[str, Any]] = cp.rest().get(path)["items"]
    return items


def test_a_pod_is_stored_with_the_claim_and_its_template_is_made(
    control_plane: cluster.ControlPlane, reporting: None, namespace: str
) -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="20Gi"))
    stored, warnings = create(control_plane, namespace, pod)
    (holder,) = stored["spec"]["containers"]
    assert holder["resources"]["claims"] == [{"name": names.DRA_CLAIM_NAME}]
    assert names.NVIDIA_GPU_RESOURCE not in holder["resources"]["limits"]
    assert stored["spec"]["schedulerName"] == "default-scheduler"
    assert "ResourceClaimTemplate gpushare-gpu-memory-20gi" in warnings
    (template,) = _templates(control_plane, namespace)
    expected = dra.claim_template(
        namespace,
        20 * 1024**3,
        unit_bytes=SETTINGS.unit_bytes,
        overhead_bytes=SETTINGS.allocation_overhead_bytes,
    )
    assert template["metadata"]["name"] == expected["metadata"]["name"]
    assert template["spec"]["spec"] == expected["spec"]["spec"]
    # a second pod of the same size finds the template there
    create(control_plane, namespace, pod)
    assert len(_templates(control_plane, namespace)) == 1


def test_a_dry_run_makes_no_template(
    control_plane: cluster.ControlPlane, reporting: None, namespace: str
) -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="12Gi"))
    metadata = {k: v for k, v in pod["metadata"].items() if k != "namespace"}
    metadata["name"] = "dry"
    control_plane.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
        input=json.dumps({**pod, "metadata": metadata}),
    )  # fmt: skip
    assert _templates(control_plane, namespace) == []


def test_a_template_the_api_refuses_refuses_the_pod_and_says_why(
    control_plane: cluster.ControlPlane, reporting: None, namespace: str
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-templates"},
        "spec": {"hard": {"count/resourceclaimtemplates.resource.k8s.io": "0"}},
    }
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(quota))
    counted = {"count/resourceclaimtemplates.resource.k8s.io": "0"}
    control_plane.kubectl(  # what kube-controller-manager's quota controller would write
        "patch", "resourcequota", "no-templates", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"hard": counted, "used": counted}}),
    )  # fmt: skip
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="20Gi"))
    metadata = {k: v for k, v in pod["metadata"].items() if k != "namespace"}
    refused = control_plane.kubectl(
        "create", "-n", namespace, "-f", "-",
        input=json.dumps({**pod, "metadata": metadata}), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "cannot create ResourceClaimTemplate" in refused.stderr
    assert "gpushare-gpu-memory-20gi" in refused.stderr
    assert _templates(control_plane, namespace) == []
