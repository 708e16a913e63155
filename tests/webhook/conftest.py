"""The webhook as a real process on loopback, with a certificate pair made by ``gpushare certs``."""

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpushare import cli
from gpushare.core import names, nodereport
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


@contextlib.contextmanager
def started(
    control_plane: cluster.ControlPlane,
    pair: Path,
    log: Path,
    settings: dict[str, str] | None = None,
) -> Iterator[Webhook]:
    """The webhook process (``settings`` as ``GPUSHARE_*`` variables), after KServe's CRDs."""
    install_kserve_crds(control_plane)
    server = Webhook(control_plane.kubeconfig, pair, log, settings=settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def registration(
    control_plane: cluster.ControlPlane,
    webhook: Webhook,
    mutated: Callable[[dict[str, Any]], bool],
    rendered: Sequence[dict[str, Any]] | None = None,
) -> Iterator[Webhook]:
    """The manifests' webhook configurations (or ``rendered`` ones) pointed at ``webhook``
    (removed afterwards).

    The apiserver reads webhook configurations through an informer: this waits until a server
    dry run of a Job's pod comes back as ``mutated`` says the webhook leaves it."""
    bodies = configurations(webhook, rendered)
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-",
        input=yaml.safe_dump_all(bodies),
    )  # fmt: skip

    def called() -> bool:
        probe = json.dumps(builders.job_pod())
        result = control_plane.kubectl(
            "create", "--dry-run=server", "-n", "default", "-o", "json", "-f", "-", input=probe
        )
        return mutated(json.loads(result.stdout))

    cluster.wait_for(called, timeout=30, what="the webhook to be called")
    try:
        yield webhook
    finally:
        for body in bodies:
            control_plane.kubectl(
                "delete", body["kind"].lower(), body["metadata"]["name"], "--ignore-not-found"
            )


def report_card(
    control_plane: cluster.ControlPlane,
    webhook: Webhook,
    namespace: str,
    card: nodereport.CardReport,
) -> None:
    """A GPU node of ``card`` owned by ``namespace``, once the webhook has read its report."""
    cluster.register_gpu_node(control_plane, f"{namespace}-gpu", [card], owner=namespace)
    cluster.wait_for(
        lambda: (
            webhook.metrics()[("gpushare_webhook_largest_card_bytes", ())] >= card.cuda_total_bytes
        ),
        what="the webhook to read the node report",
    )


@pytest.fixture(scope="module")
def webhook(
    control_plane: cluster.ControlPlane, pair: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Webhook]:
    """The webhook process, started after KServe's CRDs are installed."""
    with started(control_plane, pair, tmp_path_factory.mktemp("webhook") / "webhook.log") as server:
        yield server


@pytest.fixture(scope="module")
def registered(control_plane: cluster.ControlPlane, webhook: Webhook) -> Iterator[Webhook]:
    """The webhook configurations registered with the apiserver (removed afterwards)."""
    with registration(control_plane, webhook, _gpushare_scheduled):
        yield webhook


def _gpushare_scheduled(pod: dict[str, Any]) -> bool:
    return bool(pod["spec"].get("schedulerName") == names.SCHEDULER_NAME)
