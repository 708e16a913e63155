"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-scheduler, kubectl.

The binaries are built from Kubernetes' own Go source by ``tests/controlplane/build.sh`` into a
cache folder named by version; :func:`find_binaries` locates it. :class:`ControlPlane` runs etcd and
kube-apiserver on loopback with free ports, as controller-runtime's envtest does:

- TLS with a throwaway CA that signs both the serving certificate and the client certificates
  (``--client-ca-file``); an admin client certificate in group ``system:masters`` and a kubeconfig
  (:attr:`ControlPlane.kubeconfig`) that uses it;
- ``--authorization-mode=Node,RBAC``, so ServiceAccounts get exactly what their RBAC grants;
- a service-account signing key (``--service-account-key-file``, ``-signing-key-file``,
  ``-issuer``), so the TokenRequest API works (:meth:`ControlPlane.create_token`);
- the default admission plugins, including ``ServiceAccount`` and ``TaintNodesByCondition``.

No kube-controller-manager runs, so what its controllers would do is done here by hand:
:func:`create_namespace` also creates the ``default`` ServiceAccount (the ServiceAccount
admission plugin refuses pods without it), :func:`register_gpu_node` removes the ``not-ready`` taint
that ``TaintNodesByCondition`` puts on every new Node, and namespaces never finish terminating
(tests keep apart by namespace and by node owner label; :func:`cleanup_namespace` force-deletes what
a test left). No kubelet runs either: pods that kube-scheduler binds stay ``Pending`` on their node.

Two ways to talk to the apiserver from Python: :meth:`ControlPlane.rest` (plain dicts in and out,
:class:`ApiError` on failure; what the helpers here use) and :meth:`ControlPlane.api_client` (the
official, pydantic-typed ``kubernetes`` client).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpushare.core import names, quantities
from gpushare.core.nodereport import CardReport, NodeReport

if TYPE_CHECKING:  # the official client is imported only when asked for (0.2 s)
    from kubernetes import client as k8s

BINARIES: Final = ("etcd", "kube-apiserver", "kube-scheduler", "kubectl")
BUILD_SCRIPT: Final = Path(__file__).resolve().parent / "controlplane" / "build.sh"
ENV_BIN: Final = "GPUSHARE_CONTROLPLANE_BIN"
ENV_CACHE: Final = "GPUSHARE_CONTROLPLANE_CACHE"

KUBECONFIG_PLACEHOLDER: Final = "KUBECONFIG_PATH"
"""As ``clientConnection.kubeconfig`` in a scheduler config: replaced by the admin kubeconfig."""

LABEL_OWNER: Final = "tests.gpushare.io/owner"
"""On Nodes a test registers: the namespace owning them (:func:`cleanup_namespace` deletes them)."""

SERVICE_CLUSTER_IP_RANGE: Final = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
CONTEXT: Final = "gpushare-test"

T = TypeVar("T")


class BinariesMissingError(RuntimeError):
    """The control-plane binaries are not built (run ``tests/controlplane/build.sh``)."""


class ControlPlaneError(RuntimeError):
    """A control-plane process did not start or died; the message carries its log's tail."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError its message shows the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


# --- Binaries ---------------------------------------------------------------------------------


def _module_version(module: str) -> str:
    gomod = BUILD_SCRIPT.parent / "go.mod"
    for line in gomod.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == module and fields[1].startswith("v"):
            return fields[1]
    raise BinariesMissingError(f"{gomod} does not require {module}")


def pinned_versions() -> tuple[str, str]:
    """The Kubernetes and etcd versions pinned in ``tests/controlplane/go.mod``."""
    return _module_version("k8s.io/kubernetes"), _module_version("go.etcd.io/etcd/server/v3")


def find_binaries() -> Path:
    """The folder holding etcd, kube-apiserver, kube-scheduler and kubectl.

    ``$GPUSHARE_CONTROLPLANE_BIN`` names it directly; otherwise it is the folder build.sh fills:
    ``${GPUSHARE_CONTROLPLANE_CACHE:-~/.cache/gpushare/controlplane}/<k8s>-etcd<etcd>`` (e.g.
    ``v1.36.3-etcd3.6.8``). Raises :class:`BinariesMissingError` (saying how to build them) when
    any binary is absent.
    """
    explicit = os.environ.get(ENV_BIN)
    if explicit:
        folder = Path(explicit)
    else:
        k8s_version, etcd_version = pinned_versions()
        cache = Path(
            os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "gpushare" / "controlplane"
        )
        folder = cache / f"{k8s_version}-etcd{etcd_version.removeprefix('v')}"
    missing = [b for b in BINARIES if not os.access(folder / b, os.X_OK)]
    if missing:
        raise BinariesMissingError(
            f"control plane not built: run tests/controlplane/build.sh"
            f" ({', '.join(missing)} missing in {folder})"
        )
    return folder


# --- Certificates -------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


class _CA:
    """A throwaway certificate authority."""

    def __init__(self, common_name: str) -> None:
        self.key = _new_key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        *,
        orgs: Sequence[str] = (),
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, orgs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


# --- Processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_SETPRIV = shutil.which("setpriv")


def _dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the test process dies, even by SIGKILL.

    util-linux's ``setpriv --pdeathsig`` sets the signal before it execs the command, so the child
    needs no ``preexec_fn``: a fork that runs Python code in the child can trip gRPC's fork handlers
    (seen: ``epoll_wait error: Bad file descriptor`` aborting the child) once a test has used gRPC.
    Without setpriv, children just do not die with the test process.
    """
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def tail(path: Path, max_lines: int = 60) -> str:
    """The last ``max_lines`` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


class Process:
    """One control-plane process with its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(
            _dying_with_parent(self.argv),
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`ControlPlaneError` with the log's tail if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ControlPlaneError(
                f"{self.name} exited with code {code}; last lines of {self.log_path}:\n"
                f"{tail(self.log_path, 40)}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def _https_get(url: str, context: ssl.SSLContext, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def answers(url: str, process: Process, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 200 (plain HTTP), once; raises if ``process`` has exited."""
    process.check_alive()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something other than None (or False); return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# --- A plain REST client -------------------------------------------------------------------------

PATCH_TYPES: Final = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


class ApiError(RuntimeError):
    """The apiserver answered with an error status; ``body`` is its Status object (or text)."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")

    @property
    def reason(self) -> str:
        """``Status.reason``: NotFound, AlreadyExists, Forbidden, Invalid, Conflict..."""
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else str(self.body)


class Rest:
    """A minimal JSON client of the Kubernetes REST API: dicts in, dicts out.

    Paths are the API's own (``/api/v1/namespaces/ns/pods``). Each call opens one HTTPS request
    (loopback, cheap); safe to share across threads.
    """

    def __init__(self, base_url: str, context: ssl.SSLContext, *, token: str | None = None) -> None:
        self.base_url = base_url
        self.context = context
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str | int | bool] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one request; return the decoded JSON answer ({} if empty); raise ApiError."""
        url = self.base_url + path
        if params:
            query = {
                k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()
            }
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                error_body: Any = json.loads(text)
            except json.JSONDecodeError:
                error_body = text
            raise ApiError(method, path, exc.code, error_body) from None
        if not raw:
            return {}
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    def get(self, path: str, **params: str | int | bool) -> dict[str, Any]:
        return self.request("GET", path, params=params)

    def create(
        self, path: str, body: Mapping[str, Any], **params: str | int | bool
    ) -> dict[str, Any]:
        """POST ``body`` to a collection path (``params``: e.g. ``dryRun="All"``)."""
        return self.request("POST", path, dict(body), params=params)

    def replace(
        self, path: str, body: Mapping[str, Any], **params: str | int | bool
    ) -> dict[str, Any]:
        return self.request("PUT", path, dict(body), params=params)

    def patch(
        self,
        path: str,
        body: Any,
        patch_type: str = "merge",
        **params: str | int | bool,
    ) -> dict[str, Any]:
        """PATCH with ``patch_type`` merge, strategic, json or apply (apply needs fieldManager)."""
        return self.request(
            "PATCH", path, body, content_type=PATCH_TYPES[patch_type], params=params
        )

    def delete(self, path: str, **params: str | int | bool) -> dict[str, Any]:
        return self.request("DELETE", path, params=params)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


# --- The control plane --------------------------------------------------------------------------


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
    """etcd + kube-apiserver on loopback; optionally kube-scheduler; kubectl and clients for them.

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
        self.bin_dir = bin_dir or find_binaries()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpushare-cp-"))
        self.keep = bool(os.environ.get("GPUSHARE_KEEP_CONTROLPLANE")) if keep is None else keep
        self.extra_apiserver_args = list(apiserver_args)
        self.start_timeout = start_timeout
        self.processes: dict[str, Process] = {}
        """Latest process under each name: etcd, kube-apiserver, kube-scheduler[-N]."""
        self.port = 0
        self.etcd_port = 0
        self.startup_seconds = 0.0
        """Seconds from launching etcd to kube-apiserver's /readyz answering ok."""
        self._scheduler_serial = itertools.count(1)
        pki = self.workdir / "pki"
        self.ca_cert = pki / "ca.crt"
        """The CA that signed the apiserver's serving certificate (and the client certificates)."""
        self.ca_key = pki / "ca.key"
        self.admin_cert = pki / "admin.crt"
        self.admin_key = pki / "admin.key"
        self.serving_cert = pki / "apiserver.crt"
        self.serving_key = pki / "apiserver.key"
        self.sa_key = pki / "sa.key"
        self.sa_pub = pki / "sa.pub"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        """Admin kubeconfig (client certificate in group ``system:masters``)."""
        self._ca: _CA | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The apiserver's URL, ``https://127.0.0.1:<port>``."""
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> ControlPlane:
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
            self._bootstrap()
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
        ca = self._ca = _CA("gpushare-test-ca")
        self.ca_cert.write_bytes(_cert_pem(ca.cert))
        self.ca_key.write_bytes(_key_pem(ca.key))
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
        self.serving_cert.write_bytes(_cert_pem(cert))
        self.serving_key.write_bytes(_key_pem(key))
        key, cert = ca.issue("gpushare-test-admin", orgs=["system:masters"], client=True)
        self.admin_cert.write_bytes(_cert_pem(cert))
        self.admin_key.write_bytes(_key_pem(key))
        sa = _new_key()
        self.sa_key.write_bytes(_key_pem(sa))
        self.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
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
                code, body = _https_get(f"{self.url}/readyz", context)
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

    def _bootstrap(self) -> None:
        """What kube-controller-manager would do and tests rely on: ServiceAccount ``default``."""
        rest = self.rest()
        for namespace in ("default", "kube-system", "kube-public"):
            _ensure_service_account(rest, namespace, "default")

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

    def api_client(self, kubeconfig: Path | None = None) -> k8s.ApiClient:
        """A new official ``kubernetes.client.ApiClient`` for the admin (or the given) kubeconfig.

        Close it (``with cp.api_client() as api: ...``). The client (v37+) is pydantic-typed:
        bodies are models (``k8s.V1Pod.from_dict(d)``), fields are Optional.
        """
        from kubernetes import config as k8s_config  # noqa: PLC0415 - lazy, see above

        api: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or self.kubeconfig)
        )
        return api

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this apiserver (admin unless ``kubeconfig`` is given).

        Raises :class:`KubectlError` (showing stderr) on a non-zero exit when ``check``.
        """
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int = 3600,
    ) -> str:
        """A bound token for a ServiceAccount (the TokenRequest API, as kubelet would ask)."""
        args = ["create", "token", service_account, "-n", namespace]
        args.append(f"--duration={expiration_seconds}s")
        args += [f"--audience={aud}" for aud in audiences]
        return self.kubectl(*args).stdout.strip()

    def service_account_kubeconfig(self, namespace: str, service_account: str) -> Path:
        """A kubeconfig that acts as ``system:serviceaccount:<namespace>:<service_account>``."""
        token = self.create_token(namespace, service_account)
        path = self.workdir / "kubeconfigs" / f"{namespace}.{service_account}.kubeconfig"
        return self.write_kubeconfig(path, token=token, user=f"{namespace}:{service_account}")

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
        (folder / f"{stem}.crt").write_bytes(_cert_pem(cert))
        (folder / f"{stem}.key").write_bytes(_key_pem(key))
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
                    code, _ = _https_get(f"https://127.0.0.1:{port}/readyz", context)
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

    # -- diagnostics --------------------------------------------------------------------------

    def logs(self, max_lines: int = 60) -> dict[str, str]:
        """The tail of each process's log, by name (a stopped scheduler is marked so)."""
        out: dict[str, str] = {}
        for name, process in self.processes.items():
            label = name if process.running else f"{name} (stopped)"
            out[label] = tail(process.log_path, max_lines)
        return out


# --- Objects as kube-controller-manager, kubelet and the agent would write them ------------------

Target = ControlPlane | Rest
"""Helpers act as admin on a ControlPlane, or with the credentials of the Rest client given."""


def _rest(target: Target) -> Rest:
    return target.rest() if isinstance(target, ControlPlane) else target


def _ensure_service_account(rest: Rest, namespace: str, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
    deadline = time.monotonic() + 10
    while True:
        try:
            rest.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", body)
        except ApiError as exc:
            if exc.status == 409:
                return
            # Right after /readyz the system namespaces may not exist yet.
            if exc.status == 404 and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise
        return


def unique_name(hint: str, max_len: int = 50) -> str:
    """A DNS-1123 label from ``hint`` plus a random suffix: ``test-foo-bar-3kq9x``."""
    base = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[: max_len - 6].strip("-")
    return f"{base or 'x'}-{secrets.token_hex(3)[:5]}"


def create_namespace(target: Target, name: str, *, labels: Mapping[str, str] | None = None) -> str:
    """Create a namespace and its ``default`` ServiceAccount (no controller-manager runs)."""
    rest = _rest(target)
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    rest.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    _ensure_service_account(rest, name, "default")
    return name


def cleanup_namespace(target: Target, name: str) -> None:
    """Force-delete the namespace's pods, delete the Nodes it owns (:data:`LABEL_OWNER`), then the
    namespace itself, without waiting (it stays Terminating: no namespace controller runs)."""
    rest = _rest(target)
    with contextlib.suppress(ApiError):
        rest.delete(f"/api/v1/namespaces/{name}/pods", gracePeriodSeconds=0)
    with contextlib.suppress(ApiError):
        rest.delete("/api/v1/nodes", labelSelector=f"{LABEL_OWNER}={name}")
    with contextlib.suppress(ApiError):
        rest.delete(f"/api/v1/namespaces/{name}", propagationPolicy="Background")


def node_report(cards: Sequence[CardReport], heartbeat: dt.datetime | None = None) -> NodeReport:
    """A report of ``cards`` with a heartbeat of now (or the time given)."""
    return NodeReport(heartbeat=heartbeat or dt.datetime.now(dt.UTC), cards=tuple(cards))


def gpu_card(
    index: int = 0,
    *,
    total: int | str = "80Gi",
    used: int | str = 0,
    model: str = "NVIDIA H100 80GB HBM3",
    reserved: int | str = 0,
    healthy: bool = True,
    uuid: str | None = None,
) -> CardReport:
    """A card for a fake node (sizes in bytes or Kubernetes quantities); free = total - used."""
    total_bytes = quantities.parse_bytes(total)
    used_bytes = quantities.parse_bytes(used)
    return CardReport.model_validate(
        {
            "uuid": uuid or f"GPU-{index:08x}-0000-4000-8000-{secrets.token_hex(6)}",
            "index": index,
            "model": model,
            "total_bytes": total_bytes,
            "reserved_bytes": quantities.parse_bytes(reserved),
            "used_bytes": used_bytes,
            "free_bytes": max(0, total_bytes - used_bytes),
            "healthy": healthy,
        }
    )


def register_gpu_node(
    target: Target,
    name: str,
    cards: Sequence[CardReport],
    *,
    unit_bytes: int = quantities.GI,
    report: NodeReport | str | None = None,
    gpu_units: int | None = None,
    owner: str | None = None,
    labels: Mapping[str, str] | None = None,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: int = 110,
) -> dict[str, Any]:
    """Register a Node as kubelet, the device plugin and the agent would; return it.

    - ``status.capacity``/``allocatable``: cpu, memory, pods, and :data:`names.RESOURCE_GPU_MEMORY`
      = ``gpu_units`` or the sum of each card's whole units (``card_units(total, unit_bytes)``);
    - condition ``Ready=True``, address 127.0.0.1, no taints (the ``not-ready`` taint that
      TaintNodesByCondition adds on create is removed, as the node lifecycle controller would);
    - label :data:`names.LABEL_ENABLED` ``=true``, :data:`LABEL_OWNER` ``=owner`` when given (then
      :func:`cleanup_namespace` of that namespace deletes the node), plus ``labels``;
    - annotation :data:`names.ANNOTATION_NODE_REPORT`: ``report`` if it is a string (raw, e.g.
      malformed on purpose), its ``encode()`` if a NodeReport, else a fresh report of ``cards``.
    """
    if report is None:
        report = node_report(cards)
    encoded = report if isinstance(report, str) else report.encode()
    units = (
        gpu_units
        if gpu_units is not None
        else sum(quantities.card_units(card.total_bytes, unit_bytes) for card in cards)
    )
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        names.LABEL_ENABLED: "true",
    }
    if owner:
        node_labels[LABEL_OWNER] = owner
    node_labels.update(labels or {})
    resources = {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        names.RESOURCE_GPU_MEMORY: str(units),
    }
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status (gpushare test)",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": pinned_versions()[0],
            "kubeProxyVersion": "",
            "bootID": "",
            "machineID": "",
            "systemUUID": "",
            "containerRuntimeVersion": "containerd://2.0.0",
            "kernelVersion": "6.1.0",
            "osImage": "gpushare test node",
        },
    }
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {names.ANNOTATION_NODE_REPORT: encoded},
        },
        "spec": {},
    }
    rest = _rest(target)
    rest.create("/api/v1/nodes", body)
    rest.patch(f"/api/v1/nodes/{name}/status", {"status": status}, "strategic")
    return rest.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}}, "merge")


def set_node_report(target: Target, name: str, report: NodeReport | str) -> dict[str, Any]:
    """Rewrite a node's report annotation, as the agent does on each heartbeat or change."""
    encoded = report if isinstance(report, str) else report.encode()
    patch = {"metadata": {"annotations": {names.ANNOTATION_NODE_REPORT: encoded}}}
    return _rest(target).patch(f"/api/v1/nodes/{name}", patch, "merge")
