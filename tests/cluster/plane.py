"""The control plane of the tests: :class:`gpushare.simulator.controlplane.server.ControlPlane`
with the clients tests use (kubectl, the official client, tokens) and the ``default``
ServiceAccounts that kube-controller-manager would make.

The binaries are those ``tests/controlplane/build.sh`` builds at the versions its ``go.mod`` pins.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpushare.simulator.controlplane import binaries, server
from gpushare.simulator.controlplane.rest import ApiError, Rest

if TYPE_CHECKING:  # the official client is imported only when asked for (0.2 s)
    from kubernetes import client as k8s

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "controlplane" / "build.sh"


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError its message shows the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


def _module_version(module: str) -> str:
    gomod = BUILD_SCRIPT.parent / "go.mod"
    for line in gomod.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == module and fields[1].startswith("v"):
            return fields[1]
    raise binaries.BinariesMissingError(f"{gomod} does not require {module}")


def pinned_versions() -> tuple[str, str]:
    """The Kubernetes and etcd versions pinned in ``tests/controlplane/go.mod``."""
    return _module_version("k8s.io/kubernetes"), _module_version("go.etcd.io/etcd/server/v3")


def find_binaries() -> Path:
    """The folder of the pinned build (or ``$GPUSHARE_CONTROLPLANE_BIN``)."""
    k8s_version, etcd_version = pinned_versions()
    return binaries.find(f"{k8s_version}-etcd{etcd_version.removeprefix('v')}")


def ensure_service_account(rest: Rest, namespace: str, name: str) -> None:
    """Create a ServiceAccount unless it exists (no controller-manager makes ``default``)."""
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


class ControlPlane(server.ControlPlane):
    """etcd + kube-apiserver (+ kube-scheduler on demand) of the pinned build, with clients."""

    @staticmethod
    def default_binaries() -> Path:
        """The build at the versions ``tests/controlplane/go.mod`` pins."""
        return find_binaries()

    def bootstrap(self) -> None:
        """What kube-controller-manager would do and tests rely on: ServiceAccount ``default``."""
        rest = self.rest()
        for namespace in ("default", "kube-system", "kube-public"):
            ensure_service_account(rest, namespace, "default")

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
