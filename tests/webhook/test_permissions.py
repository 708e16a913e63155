"""The webhook runs under RBAC with exactly what it needs: watch Nodes, discover resources."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpushare.core import names
from gpushare.webhook import paths
from tests import cluster
from tests.webhook import builders, strategies
from tests.webhook.process import Webhook

RULES = [
    # The node watch: the largest card the agents report.
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    # kopf's resource discovery follows CRDs as they come and go (KServe installed later).
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
"""The webhook's ClusterRole: what the manifests must grant its ServiceAccount, and no more."""


@pytest.fixture
def limited(
    control_plane: cluster.ControlPlane, namespace: str, pair: Path, tmp_path: Path
) -> Iterator[Webhook]:
    """The webhook with a ServiceAccount token bound to :data:`RULES` only."""
    role = f"gpushare-webhook-{namespace}"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "webhook"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "webhook", "namespace": namespace}],
        },
    ]
    for body in objects:
        control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "webhook")
    server = Webhook(kubeconfig, pair, tmp_path / "webhook.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for kind in ("clusterrolebinding", "clusterrole"):
            control_plane.kubectl("delete", kind, role, "--ignore-not-found")


def test_the_webhook_serves_and_watches_nodes_with_its_role_alone(
    control_plane: cluster.ControlPlane, namespace: str, limited: Webhook
) -> None:
    cluster.register_gpu_node(
        control_plane, f"{namespace}-gpu", [cluster.gpu_card(total="48Gi")], owner=namespace
    )
    cluster.wait_for(
        lambda: limited.metrics()[("gpushare_webhook_largest_card_bytes", ())] >= 48 * 1024**3,
        what="the node report to reach the webhook",
    )
    request = strategies.review(builders.job_pod())
    answer = limited.review(paths.MUTATE_PODS, request).json()["response"]
    assert answer["allowed"] and answer["patch"]
    assert "Forbidden" not in cluster.tail(limited.log_path, 200)
    assert names.ANNOTATION_NODE_REPORT  # the annotation it reads from Nodes
