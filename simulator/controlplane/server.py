"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-scheduler.

As controller-runtime's envtest does: free ports, TLS with a throwaway CA that signs the serving
certificate and the client certificates (``--client-ca-file``), an admin kubeconfig in group
``system:masters`` (:attr:`ControlPlane.kubeconfig`), ``--authorization-mode=Node,RBAC``, and a
service-account signing key so that the TokenRequest API works. No kube-controller-manager and no
kubelet run: what they would do is the caller's (``gpushare simulate`` plays kubelet; the tests
add what they need).
"""

import contextlib
import itertools
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

import yaml

from gpushare.core import names
from gpushare.simulator.controlplane import binaries, pki
from gpushare.simulator.controlplane.launch import (
    ControlPlaneError,
    Process,
    free_port,
    https_get,
    tail,
    wait_for,
)
from gpushare.simulator.controlplane.rest import Rest

__all__ = ["KUBECONFIG_PLACEHOLDER", "SERVICE_CLUSTER_IP_RANGE", "ControlPlane", "Scheduler"]

KUBECONFIG_PLACEHOLDER: Final = "KUBECONFIG_PATH"
"""A scheduler configuration's ``clientConnection.kubeconfig`` replaced by the admin's."""
SERVICE_CLUSTER_IP_RANGE: Final = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
CONTEXT: Final = "gpushare-local"


class Scheduler:
    """A running kube-scheduler (see :meth:`ControlPlane.start_scheduler`)."""

    def __init__(self, process: Process, config_path: Path, port: int) -> None:
        self.process = process
        self.config_path = config_path
        self.port = port
        """Its secure port on 127.0.0.1 (``/readyz``, ``/metrics`` with the admin kubeconfig)."""

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log(self, max_lines: int = 200) -> str:
        return tail(self.process.log_path, max_lines)


class ControlPlane:
    """etcd + kube-apiserver on loopback; optionally kube-scheduler; kubeconfigs for them.

    Use as a context manager (or call :meth:`start` and :meth:`stop`). Everything it writes (certs,
    kubeconfig, etcd data, logs) lives in :attr:`workdir`, removed on stop unless ``keep=True`` or
    ``$GPUSHARE_KEEP_CONTROLPLANE`` is set.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        workdir: Path | None = None,
        keep: bool | None = None,
        apiserver_args: Sequence[str] = (),
        start_timeout: float = 90.0,
    ) -> None:
        self.bin_dir = bin_dir or self.default_binaries()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpushare-cp-"))
        self.keep = bool(os.environ.get(names.ENV_KEEP_CONTROLPLANE)) if keep is None else keep
        self.extra_apiserver_args = list(apiserver_args)
        self.start_timeout = start_timeout
        self.processes: dict[str, Process] = {}
        """Latest process under each name: etcd, kube-apiserver, kube-scheduler[-N]."""
        self.port = 0
        self.etcd_port = 0
        self.startup_seconds = 0.0
        """Seconds from launching etcd to kube-apiserver's /readyz answering ok."""
        self._scheduler_serial = itertools.count(1)
        folder = self.workdir / "pki"
        self.ca_cert = folder / "ca.crt"
        """The CA that signed the apiserver's serving certificate (and the client certificates)."""
        self.ca_key = folder / "ca.key"
        self.admin_cert = folder / "admin.crt"
        self.admin_key = folder / "admin.key"
        self.serving_cert = folder / "apiserver.crt"
        self.serving_key = folder / "apiserver.key"
        self.sa_key = folder / "sa.key"
        self.sa_pub = folder / "sa.pub"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        """Admin kubeconfig (client certificate in group ``system:masters``)."""
        self._ca: pki.CA | None = None

    @staticmethod
    def default_binaries() -> Path:
        """The binaries used where none are named: the newest complete build."""
        return binaries.find()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The apiserver's URL, ``https://127.0.0.1:<port>``."""
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd and kube-apiserver; return when /readyz is ok (or raise ControlPlaneError)."""
        began = time.monotonic()
        try:
            self.port = free_port()
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._wait_apiserver_ready(began)
            self.startup_seconds = time.monotonic() - began
            self.bootstrap()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process (schedulers first, etcd last) and remove the workdir unless kept."""
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _write_pki(self) -> None:
        self.ca_cert.parent.mkdir(parents=True, exist_ok=True)
        ca = self._ca = pki.CA("gpushare-local-ca")
        self.ca_cert.write_bytes(pki.cert_pem(ca.cert))
        self.ca_key.write_bytes(pki.key_pem(ca.key))
        key, cert = ca.issue(
            "kube-apiserver",
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=["127.0.0.1", "::1", "10.0.0.1"],
            server=True,
        )
        self.serving_cert.write_bytes(pki.cert_pem(cert))
        self.serving_key.write_bytes(pki.key_pem(key))
        key, cert = ca.issue("gpushare-admin", orgs=["system:masters"], client=True)
        self.admin_cert.write_bytes(pki.cert_pem(cert))
        self.admin_key.write_bytes(pki.key_pem(key))
        sa = pki.new_key()
        self.sa_key.write_bytes(pki.key_pem(sa))
        self.sa_pub.write_bytes(pki.public_pem(sa))
        for path in self.ca_cert.parent.glob("*.key"):
            path.chmod(0o600)
        self.write_kubeconfig(
            self.kubeconfig, client_cert=self.admin_cert, client_key=self.admin_key
        )

    def _launch(self, name: str, argv: Sequence[str]) -> Process:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        process = Process(name, argv, logs / f"{name}.log")
        self.processes[name] = process
        return process

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        peer = f"http://127.0.0.1:{free_port()}"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        etcd = self._launch(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            etcd.check_alive()
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=1) as response:
                    return b'"health":"true"' in response.read()
            except OSError:
                return False

        wait_for(healthy, timeout=self.start_timeout, interval=0.05, what="etcd /health")

    def _start_apiserver(self) -> None:
        self._launch(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={self.serving_cert}",
                f"--tls-private-key-file={self.serving_key}",
                f"--client-ca-file={self.ca_cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                "--allow-privileged=true",
                # No controller-manager runs the endpoint controllers; a loopback endpoint for the
                # "kubernetes" Service is invalid anyway.
                "--endpoint-reconciler-type=none",
                *self.extra_apiserver_args,
            ],
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the apiserver and presents the admin client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return context

    def _wait_apiserver_ready(self, began: float) -> None:
        apiserver = self.processes["kube-apiserver"]
        context = self.ssl_context()
        last = ""

        def ready() -> bool:
            nonlocal last
            apiserver.check_alive()
            try:
                code, body = https_get(f"{self.url}/readyz", context)
            except OSError as exc:
                last = str(exc)
                return False
            last = body
            return code == 200

        remaining = self.start_timeout - (time.monotonic() - began)
        try:
            wait_for(ready, timeout=remaining, interval=0.1, what="kube-apiserver /readyz")
        except TimeoutError as exc:
            raise ControlPlaneError(
                f"{exc}; last answer: {last[-2000:]}\n"
                f"kube-apiserver log:\n{tail(apiserver.log_path, 40)}"
            ) from exc

    def bootstrap(self) -> None:
        """What must exist once the apiserver is ready; nothing here (a subclass adds objects)."""

    # -- clients ------------------------------------------------------------------------------

    def write_kubeconfig(
        self,
        path: Path,
        *,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        token: str | None = None,
        user: str = "admin",
    ) -> Path:
        """Write a kubeconfig for this apiserver with a client certificate or a bearer token."""
        credentials: dict[str, str] = {}
        if client_cert is not None and client_key is not None:
            credentials = {
                "client-certificate": str(client_cert),
                "client-key": str(client_key),
            }
        if token is not None:
            credentials["token"] = token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CONTEXT,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.ca_cert),
                    },
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
            "current-context": CONTEXT,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def rest(self, token: str | None = None) -> Rest:
        """A :class:`Rest` client: admin (client certificate), or the bearer ``token`` given."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if token is None:
            context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return Rest(self.url, context, token=token)

    def issue_client_cert(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig authenticating as ``user`` in ``groups`` by client certificate.

        E.g. ``issue_client_cert("system:node:n1", ["system:nodes"])`` acts as a node's kubelet.
        """
        if self._ca is None:
            raise ControlPlaneError("the control plane is not started")
        key, cert = self._ca.issue(user, orgs=groups, client=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", user)
        folder = self.workdir / "kubeconfigs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.crt").write_bytes(pki.cert_pem(cert))
        (folder / f"{stem}.key").write_bytes(pki.key_pem(key))
        (folder / f"{stem}.key").chmod(0o600)
        return self.write_kubeconfig(
            folder / f"{stem}.kubeconfig",
            client_cert=folder / f"{stem}.crt",
            client_key=folder / f"{stem}.key",
            user=user,
        )

    # -- kube-scheduler -----------------------------------------------------------------------

    def scheduler_config(self, config: Path | str | Mapping[str, Any]) -> str:
        """The KubeSchedulerConfiguration YAML that :meth:`start_scheduler` would run.

        ``config`` is YAML text, a path to a YAML file, or the parsed mapping. Its
        ``clientConnection.kubeconfig`` is set to the admin kubeconfig when it is missing or is the
        placeholder ``KUBECONFIG_PATH``; ``leaderElection.leaderElect`` is forced to false.
        """
        if isinstance(config, Path):
            parsed: Any = yaml.safe_load(config.read_text())
        elif isinstance(config, str):
            parsed = yaml.safe_load(config)
        else:
            parsed = dict(config)
        if not isinstance(parsed, dict):
            raise ValueError("a KubeSchedulerConfiguration must be a YAML mapping")
        parsed.setdefault("apiVersion", "kubescheduler.config.k8s.io/v1")
        parsed.setdefault("kind", "KubeSchedulerConfiguration")
        connection = dict(parsed.get("clientConnection") or {})
        if connection.get("kubeconfig") in (None, "", KUBECONFIG_PLACEHOLDER):
            connection["kubeconfig"] = str(self.kubeconfig)
        parsed["clientConnection"] = connection
        election = dict(parsed.get("leaderElection") or {})
        election["leaderElect"] = False
        parsed["leaderElection"] = election
        return yaml.safe_dump(parsed, sort_keys=False)

    @contextlib.contextmanager
    def start_scheduler(
        self,
        config: Path | str | Mapping[str, Any] = "{}",
        *,
        args: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> Iterator[Scheduler]:
        """Run the real kube-scheduler with ``--config`` (see :meth:`scheduler_config`) until exit.

        Waits for its ``/readyz`` (informers synced), so pods created inside the block get
        scheduled. Its log stays readable in :meth:`logs` after it stops, until the next scheduler.
        """
        serial = next(self._scheduler_serial)
        name = "kube-scheduler"
        suffix = 2
        while name in self.processes and self.processes[name].running:
            name = f"kube-scheduler-{suffix}"
            suffix += 1
        folder = self.workdir / "schedulers"
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / f"scheduler-{serial}.yaml"
        config_path.write_text(self.scheduler_config(config))
        port = free_port()
        process = Process(
            name,
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--config={config_path}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={folder / f'certs-{serial}'}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                *args,
            ],
            folder / f"scheduler-{serial}.log",
        )
        self.processes[name] = process
        scheduler = Scheduler(process, config_path, port)
        try:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE

            def ready() -> bool:
                process.check_alive()
                try:
                    code, _ = https_get(f"https://127.0.0.1:{port}/readyz", context)
                except OSError:
                    return False
                return code == 200

            try:
                wait_for(ready, timeout=ready_timeout, what="kube-scheduler /readyz")
            except TimeoutError as exc:
                raise ControlPlaneError(f"{exc}\n{scheduler.log(40)}") from exc
            yield scheduler
        finally:
            process.stop()

    def start_controller_manager(self, controllers: Sequence[str]) -> Process:
        """kube-controller-manager running only ``controllers``, acting as the admin; it stops
        with the control plane."""
        process = Process(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                f"--root-ca-file={self.ca_cert}",
                f"--service-account-private-key-file={self.sa_key}",
                "--use-service-account-credentials=false",
                f"--controllers={','.join(controllers)}",
            ],
            self.workdir / "logs" / "kube-controller-manager.log",
        )
        self.processes["kube-controller-manager"] = process
        return process

    # -- diagnostics --------------------------------------------------------------------------

    def logs(self, max_lines: int = 60) -> dict[str, str]:
        """The tail of each process's log, by name (a stopped scheduler is marked so)."""
        out: dict[str, str] = {}
        for name, process in self.processes.items():
            label = name if process.running else f"{name} (stopped)"
            out[label] = tail(process.log_path, max_lines)
        return out
