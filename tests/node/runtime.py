"""A real node for the tests: containerd (built from its Go module by
``tests/node/containerd/build.sh``) and runc (Debian's), the real kubelet, and the
kube-controller-manager that turns Deployments into pods, joined to a test control plane.

:class:`Containerd` runs containerd with its own root, state, socket and CNI folders (a bridge of
its own, host-local addresses, no masquerading) and removes every container it ran when it stops.
It applies the CDI specs in :data:`CDI_DIR`, where the DRA backend's agent writes a prepared
claim's environment and mounts (Debian's containerd 1.6 has no CDI).
:class:`Kubelet` runs the kubelet built from the pinned Kubernetes source against it. The machines
these tests run on mount cgroup v1, so the kubelet is configured with ``failCgroupV1: false``
(the pinned release refuses cgroup v1 by default) and ``cgroupDriver: cgroupfs`` (no systemd);
images come from the OCI archives that ``tests/node/images.sh`` builds, imported with ``ctr``
(no registry).

kubelet's device-plugin socket is fixed (``/var/lib/kubelet/device-plugins/kubelet.sock``), so one
test node runs on a machine at a time: :func:`node_lock` holds a lock for it. Everything here needs
root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare.core import config
from tests import cluster

KUBELET_DIR: Final = Path("/var/lib/kubelet")
"""kubelet's root folder; its device-plugin socket is under it whatever ``--root-dir`` says."""
IMAGES_SCRIPT: Final = Path(__file__).resolve().parent / "images.sh"
CONTAINERD_SCRIPT: Final = Path(__file__).resolve().parent / "containerd" / "build.sh"
MPS_ROOT: Final = config.AgentSettings().mps_root
"""The agent's MPS pipe folders on the host (the shipped ``agent.mps_root``)."""
CDI_DIR: Final = Path("/var/run/cdi")
"""Where the agent writes CDI specs (the DRA install's host folder) and containerd reads them."""
LOCK: Final = Path("/run/gpushare-test-node.lock")
CNI_BIN: Final = Path("/usr/lib/cni")
BRIDGE: Final = "gpushare-test0"
POD_SUBNET: Final = "10.244.77.0/24"
NODE_IP: Final = "10.244.76.1"
"""The node's address, added to the loopback interface: kubelet refuses a 127.x node IP, and an
address on ``lo`` keeps its (anonymous, test-only) API to this machine."""
KUBERNETES_SERVICE: Final = "10.0.0.1"
"""The ``kubernetes`` Service's cluster IP (the first of ``cluster.SERVICE_CLUSTER_IP_RANGE``)."""
APISERVER_ARGS: Final = (
    # Reach kubelet (logs, exec) at its address: its node name resolves nowhere.
    "--kubelet-preferred-address-types=InternalIP",
    # Pods reach the apiserver at the node's address (service_route); the tests at 127.0.0.1.
    "--bind-address=0.0.0.0",
    # No kube-proxy: the apiserver calls the webhook's Service at one of its endpoints.
    "--enable-aggregator-routing=true",
)
"""The node tests' kube-apiserver flags, beside those of :class:`cluster.ControlPlane`."""
K8S_NAMESPACE: Final = "k8s.io"
"""containerd's namespace for the CRI's images and containers."""
NODE_BINARIES: Final = ("kubelet", "kube-controller-manager")
TOOLS: Final = ("runc", "buildah", "mmdebstrap", "iptables")


class NodeUnavailableError(RuntimeError):
    """Something the real node needs is missing on this machine (the message says what)."""


def check_machine(bin_dir: Path) -> None:
    """Raise :class:`NodeUnavailableError` unless root, the tools and the node binaries are here."""
    if os.geteuid() != 0:
        raise NodeUnavailableError("the real node needs root (kubelet, containerd)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise NodeUnavailableError(
            f"{', '.join(missing)} not on PATH (apt-get install runc buildah mmdebstrap iptables)"
        )
    absent = [b for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if absent:
        raise NodeUnavailableError(
            f"{', '.join(absent)} not built: run tests/controlplane/build.sh"
        )
    if not CNI_BIN.joinpath("bridge").exists():
        raise NodeUnavailableError(f"no CNI plugins in {CNI_BIN} (containernetworking-plugins)")


@contextlib.contextmanager
def node_lock() -> Iterator[None]:
    """Hold the machine's test-node lock (kubelet's device-plugin folder is machine-wide)."""
    with LOCK.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeUnavailableError(f"another test node runs on this machine ({LOCK})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_containerd() -> Path:
    """Run ``tests/node/containerd/build.sh`` (a no-op when built): the folder of containerd, its
    runc shim and ``ctr``."""
    result = subprocess.run(
        ["bash", str(CONTAINERD_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        raise NodeUnavailableError(
            f"tests/node/containerd/build.sh failed:\n{result.stderr[-3000:]}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def build_images(bin_dir: Path) -> dict[str, tuple[Path, str]]:
    """Run ``tests/node/images.sh`` (a no-op when built) with the kube-scheduler of ``bin_dir``:
    each image's OCI archive and reference, by name."""
    result = subprocess.run(
        ["bash", str(IMAGES_SCRIPT), str(bin_dir / "kube-scheduler")],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if result.returncode != 0:
        raise NodeUnavailableError(f"tests/node/images.sh failed:\n{result.stderr[-3000:]}")
    folder = Path(result.stdout.strip().splitlines()[-1])
    pairs = (line.split() for line in (folder / "images.txt").read_text().splitlines())
    return {name: (folder / f"{name}.tar", ref) for name, ref in pairs}


def _unmount_below(folder: Path) -> None:
    """Unmount ``folder`` and whatever is mounted under it (deepest first): pod volumes, rootfs
    mounts, and kubelet's bind mount of its own folder onto itself."""
    top = str(folder.resolve())
    with open("/proc/self/mountinfo") as handle:
        points = {line.split()[4] for line in handle}
    inside = (p for p in points if p == top or p.startswith(top + "/"))
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


MARK: Final = KUBELET_DIR / ".gpushare-test-node"
"""Marks a kubelet folder as the test node's: only such a folder is ever emptied."""


def claim_kubelet_dir() -> None:
    """Make :data:`KUBELET_DIR` the test node's, empty; refuse a folder some other kubelet uses."""
    if KUBELET_DIR.exists() and not MARK.exists():
        raise NodeUnavailableError(
            f"{KUBELET_DIR} exists and is not the test node's: is a kubelet installed here?"
        )
    release_kubelet_dir()
    KUBELET_DIR.mkdir(parents=True)
    MARK.touch()


def release_kubelet_dir() -> None:
    """Unmount what the test kubelet mounted and remove its folder."""
    if KUBELET_DIR.exists():
        _unmount_below(KUBELET_DIR)
        shutil.rmtree(KUBELET_DIR, ignore_errors=True)


@contextlib.contextmanager
def node_address() -> Iterator[str]:
    """:data:`NODE_IP` on the loopback interface, removed on exit."""
    address = f"{NODE_IP}/32"
    subprocess.run(
        ["ip", "address", "delete", address, "dev", "lo"], check=False, capture_output=True
    )
    subprocess.run(["ip", "address", "add", address, "dev", "lo"], check=True, capture_output=True)
    try:
        yield NODE_IP
    finally:
        subprocess.run(
            ["ip", "address", "delete", address, "dev", "lo"], check=False, capture_output=True
        )


@contextlib.contextmanager
def service_route(apiserver_port: int) -> Iterator[None]:
    """The rule kube-proxy would write for the ``kubernetes`` Service, for pods of this node: their
    connections to :data:`KUBERNETES_SERVICE`:443 go to the apiserver (removed on exit)."""
    rule = [
        "PREROUTING", "-s", POD_SUBNET, "-d", KUBERNETES_SERVICE, "-p", "tcp", "--dport", "443",
        "-j", "DNAT", "--to-destination", f"{NODE_IP}:{apiserver_port}",
    ]  # fmt: skip

    def iptables(action: str, *, check: bool) -> None:
        result = subprocess.run(
            ["iptables", "-t", "nat", action, *rule], capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise NodeUnavailableError(f"iptables {action} failed: {result.stderr.strip()}")

    iptables("-D", check=False)
    iptables("-A", check=True)
    try:
        yield
    finally:
        iptables("-D", check=False)


class Containerd:
    """containerd with folders of its own under :attr:`workdir`; use as a context manager."""

    def __init__(self, bin_dir: Path, sandbox_image: str) -> None:
        self.bin_dir = bin_dir
        # Short: unix socket paths must stay under 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="gsn-", dir="/tmp"))
        self.socket = self.workdir / "containerd.sock"
        self.sandbox_image = sandbox_image
        self.process: cluster.Process | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def config(self) -> str:
        w = self.workdir
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        return f"""version = 3
root = "{w / "root"}"
state = "{w / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "{w / "opt"}"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{self.sandbox_image}"
[{runtime}]
  disable_hugetlb_controller = true
  # Test processes may not lower their oom_score_adj (kubelet asks -998 for sandboxes): clamp it.
  restrict_oom_score_adj = true
  cdi_spec_dirs = ["{CDI_DIR}"]
[{runtime}.containerd]
  default_runtime_name = "runc"
[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtime}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{runtime}.cni]
  bin_dirs = ["{CNI_BIN}"]
  conf_dir = "{w / "net.d"}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

    def network(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": "gpushare-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        (self.workdir / "net.d").mkdir()
        (self.workdir / "net.d" / "10-gpushare-test.conflist").write_text(
            json.dumps(self.network())
        )
        config = self.workdir / "config.toml"
        config.write_text(self.config())
        # containerd finds its shim on PATH: the one built beside it, not a packaged one.
        path = f"{self.bin_dir}:{os.environ.get('PATH', '')}"
        process = self.process = cluster.Process(
            "containerd",
            [str(self.bin_dir / "containerd"), f"--config={config}", "--log-level=info"],
            self.workdir / "containerd.log",
            env={**os.environ, "PATH": path},
        )

        def ready() -> bool:
            process.check_alive()
            return self.ctr("version", check=False).returncode == 0

        cluster.wait_for(ready, timeout=60, interval=0.2, what="containerd to answer")

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd, in the CRI's namespace."""
        return subprocess.run(
            [
                str(self.bin_dir / "ctr"),
                f"--address={self.socket}",
                f"--namespace={K8S_NAMESPACE}",
                *args,
            ],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def import_image(self, archive: Path) -> None:
        """Import an OCI archive; the CRI then finds its image by the reference inside."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def images(self) -> list[str]:
        return self.ctr("images", "list", "--quiet").stdout.split()

    def remove_containers(self) -> None:
        """Kill every task and delete every container (shims outlive containerd otherwise)."""
        for task in self.ctr("tasks", "list", "--quiet", check=False).stdout.split():
            self.ctr("tasks", "kill", "--all", "--signal=SIGKILL", task, check=False)
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "list", "--quiet", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def log(self, lines: int = 60) -> str:
        return cluster.tail(self.workdir / "containerd.log", lines)

    def stop(self) -> None:
        if self.process is not None and self.process.running:
            self.remove_containers()
            self.process.stop()
        _unmount_below(self.workdir)
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


class Kubelet:
    """The real kubelet as node ``name`` of ``cp``, on ``runtime``; restartable."""

    def __init__(
        self,
        cp: cluster.ControlPlane,
        runtime: Containerd,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.cp = cp
        self.runtime = runtime
        self.name = name
        self.labels = dict(labels or {})
        self.workdir = runtime.workdir / "kubelet"
        self.port = cluster.free_port()
        self.healthz_port = cluster.free_port()
        self.process: cluster.Process | None = None
        self.starts = 0

    def config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # The pinned kubelet refuses cgroup v1 unless told otherwise; these machines have v1.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": self.runtime.endpoint,
            "address": NODE_IP,
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            # Logs and exec through the apiserver: it presents no client certificate here.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            # A shared test machine's disk must not evict the test pods nor their images.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
        }  # fmt: skip

    def start(self) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(self.config()))
        kubeconfig = self.cp.issue_client_cert(f"system:node:{self.name}", ["system:nodes"])
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        process = self.process = cluster.Process(
            f"kubelet-{self.starts}",
            [
                str(self.cp.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={KUBELET_DIR}",
                f"--cert-dir={self.workdir / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                *([f"--node-labels={labels}"] if labels else []),
                "--v=2",
            ],
            self.workdir / f"kubelet-{self.starts}.log",
        )

        url = f"http://127.0.0.1:{self.healthz_port}/healthz"
        cluster.wait_for(
            lambda: cluster.answers(url, process), timeout=120, interval=0.5,
            what="kubelet /healthz",
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)

    def log(self, lines: int = 80) -> str:
        return cluster.tail(self.process.log_path, lines) if self.process else ""
