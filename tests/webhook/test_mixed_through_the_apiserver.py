"""A cluster that runs both backends (``manifests/overlays/mixed``) behind the real kube-apiserver:
the apiserver sends the pods of namespaces labelled ``gpushare.io/backend=dra`` to the webhook's
DRA path and every other namespace's to the configured backend's (the extender)."""

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gpushare.core import names
from gpushare.webhook import paths
from tests import cluster
from tests.dra import objects
from tests.manifests.render import MANIFESTS, render
from tests.webhook import builders
from tests.webhook.conftest import registration, report_card
from tests.webhook.process import Webhook
from tests.webhook.test_through_the_apiserver import create

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mixed(control_plane: cluster.ControlPlane, webhook: Webhook) -> Iterator[Webhook]:
    """The mixed overlay's webhook configurations, pointed at the (extender-configured) webhook."""
    rendered = [
        body
        for body in render(MANIFESTS / "overlays" / "mixed")
        if body["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    ]
    with registration(control_plane, webhook, _by_the_extender, rendered):
        yield webhook


def _by_the_extender(pod: dict[str, Any]) -> bool:
    return bool(pod["spec"].get("schedulerName") == names.SCHEDULER_NAME)


def _pod() -> dict[str, Any]:
    return builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="20Gi"))


def test_a_namespace_labelled_dra_gets_claims_and_the_others_the_extender(
    control_plane: cluster.ControlPlane, mixed: Webhook, namespace: str
) -> None:
    card = cluster.gpu_card(total=objects.H100_TOTAL, reserved=objects.H100_RESERVED)
    report_card(control_plane, mixed, namespace, card)
    plain, _ = create(control_plane, namespace, _pod())
    (container,) = plain["spec"]["containers"]
    assert container["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == "20"
    assert plain["spec"]["schedulerName"] == names.SCHEDULER_NAME

    control_plane.kubectl("label", "namespace", namespace, f"{names.LABEL_BACKEND}=dra")
    before = mixed.requests_total(paths.MUTATE_PODS_DRA)
    cluster.wait_for(  # the apiserver reads namespace labels from its informer
        lambda: _dry_run_claims(control_plane, namespace), timeout=30, what="the DRA path"
    )
    stored, warnings = create(control_plane, namespace, _pod())
    (holder,) = stored["spec"]["containers"]
    assert holder["resources"]["claims"] == [{"name": names.DRA_CLAIM_NAME}]
    assert names.RESOURCE_GPU_MEMORY not in holder["resources"].get("limits", {})
    assert stored["spec"]["schedulerName"] == "default-scheduler"
    assert "ResourceClaimTemplate gpushare-gpu-memory-20gi" in warnings
    assert mixed.requests_total(paths.MUTATE_PODS_DRA) > before


def _dry_run_claims(cp: cluster.ControlPlane, namespace: str) -> bool:
    pod = _pod()
    metadata = {k: v for k, v in pod["metadata"].items() if k != "namespace"}
    text = json.dumps({**pod, "metadata": metadata})
    result = cp.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=text
    )
    return bool(json.loads(result.stdout)["spec"].get("resourceClaims"))
