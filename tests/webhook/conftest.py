"""The webhook as a real process on loopback, with a certificate pair made by ``gpushare certs``."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpushare import cli, names
from tests import cluster
from tests.webhook import builders
from tests.webhook.process import Webhook, configurations

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and serving pair for 127.0.0.1, made by ``gpushare certs``."""
    out = tmp_path_factory.mktemp("pair")
    assert cli.main(["certs", "--out", str(out), "--dns", "127.0.0.1", "--dns", "localhost"]) == 0
    return out


def install_kserve_crds(control_plane: cluster.ControlPlane) -> None:
    """KServe's CRDs, applied server-side (they are too large for apply's annotation)."""
    for name in (
        "serving.kserve.io_inferenceservices.yaml",
        "serving.kserve.io_clusterservingruntimes.yaml",
    ):
        path = str(builders.shared("kserve", name))
        control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", path, timeout=120,
        )  # fmt: skip
    rest = control_plane.rest()

    def established() -> bool:
        crd = rest.get(f"{CRDS}/inferenceservices.serving.kserve.io")
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    cluster.wait_for(established, timeout=60, what="the InferenceService CRD")


@pytest.fixture(scope="module")
def webhook(
    control_plane: cluster.ControlPlane, pair: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Webhook]:
    """The webhook process, started after KServe's CRDs are installed."""
    install_kserve_crds(control_plane)
    log = tmp_path_factory.mktemp("webhook") / "webhook.log"
    server = Webhook(control_plane.kubeconfig, pair, log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _mutates(control_plane: cluster.ControlPlane) -> bool:
    probe = json.dumps(builders.job_pod())
    result = control_plane.kubectl(
        "create", "--dry-run=server", "-n", "default", "-o", "json", "-f", "-", input=probe
    )
    return bool(json.loads(result.stdout)["spec"].get("schedulerName") == names.SCHEDULER_NAME)


@pytest.fixture(scope="module")
def registered(control_plane: cluster.ControlPlane, webhook: Webhook) -> Iterator[Webhook]:
    """The webhook configurations registered with the apiserver (removed afterwards)."""
    bodies = configurations(webhook)
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-",
        input=yaml.safe_dump_all(bodies),
    )  # fmt: skip
    # The apiserver reads webhook configurations through an informer: wait until it calls ours.
    cluster.wait_for(lambda: _mutates(control_plane), timeout=30, what="the webhook to be called")
    try:
        yield webhook
    finally:
        for body in bodies:
            control_plane.kubectl(
                "delete", body["kind"].lower(), body["metadata"]["name"], "--ignore-not-found"
            )
