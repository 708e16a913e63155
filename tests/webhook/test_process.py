"""``gpushare webhook`` as a process: it logs in from ``--kubeconfig``, stops on SIGTERM and serves
a renewed pair."""

import signal
from pathlib import Path

import requests

from gpushare.webhook import certs, paths
from tests import cluster
from tests.webhook import builders, strategies
from tests.webhook.process import Webhook

EXIT_SECONDS = 10
"""Generous: a clean stop takes a fraction of a second (kopf's signal handling)."""


def test_sigterm_stops_the_webhook_cleanly_with_a_connection_open(
    control_plane: cluster.ControlPlane, pair: Path, tmp_path: Path
) -> None:
    webhook = Webhook(control_plane.kubeconfig, pair, tmp_path / "webhook.log")
    webhook.start()
    try:
        # The apiserver keeps its connection to a webhook open between calls; so does the session.
        request = strategies.review(builders.job_pod())
        assert webhook.review(paths.MUTATE_PODS, request).json()["response"]["allowed"]
        assert webhook.process is not None
        webhook.process.send_signal(signal.SIGTERM)
        assert webhook.process.wait(timeout=EXIT_SECONDS) == 0
    finally:
        webhook.stop()
    assert "admission stopped; exiting" in webhook.log_path.read_text()


def test_the_webhook_starts_as_a_uid_the_password_database_does_not_know(
    control_plane: cluster.ControlPlane, pair: Path, tmp_path: Path
) -> None:
    # The image runs as 65532, which python:3.11-slim's /etc/passwd does not name.
    webhook = Webhook(control_plane.kubeconfig, pair, tmp_path / "webhook.log", unknown_user=True)
    webhook.start()
    try:
        request = strategies.review(builders.job_pod())
        assert webhook.review(paths.MUTATE_PODS, request).json()["response"]["allowed"]
    finally:
        webhook.stop()


def test_the_webhook_logs_in_with_the_kubeconfig_it_is_given(
    control_plane: cluster.ControlPlane, namespace: str, pair: Path, tmp_path: Path
) -> None:
    # No KUBECONFIG and no ~/.kube/config: only --kubeconfig lets it watch the Nodes.
    webhook = Webhook(control_plane.kubeconfig, pair, tmp_path / "webhook.log", flag=True)
    webhook.start()
    try:
        cluster.register_gpu_node(
            control_plane, f"{namespace}-gpu", [cluster.gpu_card(total="40Gi")], owner=namespace
        )
        cluster.wait_for(
            lambda: webhook.metrics()[("gpushare_webhook_largest_card_bytes", ())] >= 40 * 1024**3,
            what="the webhook to read the node report",
        )
    finally:
        webhook.stop()


def test_a_renewed_pair_is_served_without_a_restart(
    control_plane: cluster.ControlPlane, tmp_path: Path
) -> None:
    pair = tmp_path / "pair"
    certs.write(certs.make(["127.0.0.1"]), pair)
    webhook = Webhook(control_plane.kubeconfig, pair, tmp_path / "webhook.log")
    webhook.start()
    try:
        request = strategies.review(builders.job_pod())
        assert webhook.review(paths.MUTATE_PODS, request).status_code == 200
        renewed = tmp_path / "renewed"
        certs.write(certs.make(["127.0.0.1"]), renewed)
        for name in ("tls.key", "tls.crt"):  # as kubelet swaps a Secret's files
            (pair / name).write_bytes((renewed / name).read_bytes())

        def served_with_the_new_pair() -> bool:
            try:
                requests.post(
                    f"{webhook.url}/{paths.MUTATE_PODS}",
                    json=request,
                    verify=str(renewed / "ca.crt"),
                    timeout=5,
                )
            except requests.exceptions.SSLError:
                return False
            return True

        cluster.wait_for(
            served_with_the_new_pair, timeout=60, interval=0.5, what="the renewed pair"
        )
        assert webhook.process is not None and webhook.process.poll() is None
    finally:
        webhook.stop()
