"""``gpushare webhook`` as a real process on loopback, for tests and benchmarks."""

import base64
import copy
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import cluster

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "webhook"


UNKNOWN_USER = """
import pwd, runpy, sys
def getpwuid(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = getpwuid
sys.argv[0] = "gpushare"
runpy.run_module("gpushare.cli", run_name="__main__")
"""
"""``python -c`` program: ``gpushare`` as a uid with no entry in the password database."""


class Webhook:
    """``gpushare webhook`` in a subprocess, talking to the test apiserver."""

    def __init__(
        self,
        kubeconfig: Path,
        pair: Path,
        log: Path,
        *,
        flag: bool = False,
        settings: dict[str, str] | None = None,
        unknown_user: bool = False,
    ) -> None:
        """``flag``: name the kubeconfig with ``--kubeconfig`` (with no ``KUBECONFIG``, and a
        ``HOME`` without ``.kube/config``) rather than in ``KUBECONFIG``. ``settings``:
        configuration as ``GPUSHARE_*`` variables (``{"GPUSHARE_BACKEND": "dra"}``).
        ``unknown_user``: run as an image's uid does that the password database does not know
        (no login name in the environment, ``pwd.getpwuid`` fails)."""
        self.kubeconfig = kubeconfig
        self.pair = pair
        self.log_path = log
        self.flag = flag
        self.settings = dict(settings or {})
        self.unknown_user = unknown_user
        self.port = cluster.free_port()
        self.probe_port = cluster.free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def probes(self) -> str:
        return f"http://127.0.0.1:{self.probe_port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSHARE_")}
        env.update(self.settings)
        program = ["-c", UNKNOWN_USER] if self.unknown_user else ["-m", "gpushare.cli"]
        argv = [
            sys.executable, *program, "webhook",
            "--listen", f"127.0.0.1:{self.port}",
            "--tls-cert", str(self.pair / "tls.crt"),
            "--tls-key", str(self.pair / "tls.key"),
            "--probe-listen", f"127.0.0.1:{self.probe_port}",
        ]  # fmt: skip
        if self.flag:
            env.pop("KUBECONFIG", None)
            env["HOME"] = str(self.log_path.parent)
            argv += ["--kubeconfig", str(self.kubeconfig)]
        else:
            env["KUBECONFIG"] = str(self.kubeconfig)
        if self.unknown_user:
            for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
                env.pop(name, None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            cluster.wait_for(self._ready, timeout=60, interval=0.2, what="webhook /readyz")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{cluster.tail(self.log_path)}") from exc

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"webhook exited\n{cluster.tail(self.log_path)}")
        try:
            return requests.get(f"{self.probes}/readyz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST to ``/path`` over HTTPS, trusting only the pair's CA.

        ``verify`` is given on each call: a session's own would lose to ``REQUESTS_CA_BUNDLE``.
        """
        return self.session.post(
            f"{self.url}/{path}", verify=str(self.pair / "ca.crt"), timeout=10, **kwargs
        )

    def review(self, path: str, body: Any) -> requests.Response:
        """POST one AdmissionReview (or anything) to ``/path``."""
        return self.post(path, json=body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by name and sorted labels."""
        text = requests.get(f"{self.probes}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def requests_total(self, webhook: str) -> float:
        """Requests answered on one path, whatever their outcome."""
        return sum(
            value
            for (name, labels), value in self.metrics().items()
            if name == "gpushare_webhook_requests_total" and ("webhook", webhook) in labels
        )


def configurations(
    webhook: Webhook, bodies: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The manifests' webhook configurations (or ``bodies``, as an overlay renders them), pointed
    at the test webhook (URL and CA bundle)."""
    bundle = base64.b64encode((webhook.pair / "ca.crt").read_bytes()).decode()
    out = []
    if bodies is None:
        paths = sorted(MANIFESTS.glob("*-webhook-configuration.yaml"))
        bodies = [yaml.safe_load(path.read_text()) for path in paths]
    for found in bodies:
        body = copy.deepcopy(found)
        for hook in body["webhooks"]:
            service = hook["clientConfig"].pop("service")
            hook["clientConfig"] = {"url": webhook.url + service["path"], "caBundle": bundle}
        out.append(body)
    return out
