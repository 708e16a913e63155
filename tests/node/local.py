"""A local cluster on a real kubelet without a GPU: a control plane with kube-controller-manager,
the real kubelet on containerd, and gpushare's parts as host processes on loopback (the webhook over
HTTPS, the extender under the real kube-scheduler, the device plugin on kubelet's sockets with a
fake NVML file of one H100 and the MPS stand-in).

:func:`start` runs it for the `node` tests; ``python -m tests.node.local`` (as root, after
``tests/controlplane/build.sh`` and ``tests/node/images.sh``; ``tests/node/up.sh`` does all three)
runs it until Ctrl-C and prints how to reach it.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare import names
from tests import cluster
from tests.deviceplugin.conftest import CARD_A, FakeControl, card, write_fake
from tests.manifests.parts import install_kserve_crds
from tests.node import runtime
from tests.webhook.process import Webhook, configurations

ROOT: Final = Path(__file__).resolve().parents[2]
SCHEDULER_CONFIG: Final = ROOT / "manifests" / "scheduler" / "kube-scheduler-config.yaml"
CONTROLLERS: Final = (
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "node-lifecycle-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
)
"""What turns Deployments into pods, deletes what they and namespaces owned, and lets a new node
take pods."""


@dataclass
class RealNode:
    """The running cluster of the `node` tests."""

    cp: cluster.ControlPlane
    containerd: runtime.Containerd
    kubelet: runtime.Kubelet
    images: dict[str, str]
    """Reference of each image by name: gpushare, vllm-standin, pause."""
    nvml_file: Path
    mps: FakeControl
    device_plugin: cluster.Process
    parts: dict[str, cluster.Process | Webhook] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kubelet.name

    def logs(self) -> dict[str, str]:
        out = {"kubelet": self.kubelet.log(60), "containerd": self.containerd.log(30)}
        out["device-plugin"] = cluster.tail(self.device_plugin.log_path, 40)
        for name, part in self.parts.items():
            out[name] = cluster.tail(part.log_path, 30)
        return out


def _start_device_plugin(
    folder: Path, cp: cluster.ControlPlane, node: str, nvml: Path, mps: FakeControl
) -> cluster.Process:
    settings = folder / "gpushare.yaml"
    settings.write_text(yaml.safe_dump({"agent": {"mps_root": str(folder / "mps")}}))
    port = cluster.free_port()
    argv = [
        sys.executable,
        "-m",
        "gpushare.cli",
        "device-plugin",
        f"--kubelet-dir={runtime.KUBELET_DIR}",
        f"--nvml=fake:{nvml}",
        f"--metrics-listen=127.0.0.1:{port}",
        f"--node-name={node}",
        "--isolation=mps",
        f"--mps-control={mps.path}",
        f"--kubeconfig={cp.kubeconfig}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSHARE_")}
    env[names.ENV_CONFIG_FILE] = str(settings)
    return cluster.Process("device-plugin", argv, folder / "device-plugin.log", env=env)


@contextlib.contextmanager
def _extender(cp: cluster.ControlPlane, folder: Path) -> Iterator[cluster.Process]:
    port = cluster.free_port()
    process = cluster.Process(
        "extender",
        [
            sys.executable,
            "-m",
            "gpushare.cli",
            "scheduler",
            f"--listen=127.0.0.1:{port}",
            f"--kubeconfig={cp.kubeconfig}",
        ],
        folder / "extender.log",
    )
    config: dict[str, Any] = yaml.safe_load(SCHEDULER_CONFIG.read_text())
    config["extenders"][0]["urlPrefix"] = f"http://127.0.0.1:{port}/gpushare-scheduler"
    try:
        with cp.start_scheduler(config):
            yield process
    finally:
        process.stop()


def _node_ready(cp: cluster.ControlPlane, name: str) -> bool:
    try:
        node = cp.rest().get(f"/api/v1/nodes/{name}")
    except cluster.ApiError:
        return False
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
    )
    units = int(node["status"].get("allocatable", {}).get(names.RESOURCE_GPU_MEMORY, "0"))
    reported = names.ANNOTATION_NODE_REPORT in node["metadata"].get("annotations", {})
    untainted = not node["spec"].get("taints")
    return ready and units > 0 and reported and untainted


def _certificates(folder: Path) -> Path:
    pair = folder / "pair"
    command = [sys.executable, "-m", "gpushare.cli", "certs", "--out", str(pair)]
    subprocess.run([*command, "--dns", "127.0.0.1"], check=True, capture_output=True)
    return pair


@contextlib.contextmanager
def start(folder: Path) -> Iterator[RealNode]:
    """Start it all (files under ``folder``); stop it all, containers included, on exit.

    Raises :class:`runtime.NodeUnavailableError` when the machine lacks what it needs.
    """
    bin_dir = cluster.find_binaries()
    runtime.check_machine(bin_dir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(runtime.node_lock())
        built = runtime.build_images()
        images = {name: ref for name, (_, ref) in built.items()}
        # Reach kubelet (logs, exec) at its address: its node name resolves nowhere.
        address = ["--kubelet-preferred-address-types=InternalIP"]
        cp = stack.enter_context(cluster.ControlPlane(bin_dir, apiserver_args=address))
        kcm = runtime.start_controller_manager(cp, CONTROLLERS)
        stack.callback(kcm.stop)
        runtime.claim_kubelet_dir()
        stack.callback(runtime.release_kubelet_dir)
        containerd = stack.enter_context(runtime.Containerd(images["pause"]))
        for archive, _ in built.values():
            containerd.import_image(archive)

        install_kserve_crds(cp)
        webhook = Webhook(cp.kubeconfig, _certificates(folder), folder / "webhook.log")
        webhook.start()
        stack.callback(webhook.stop)
        hooks = yaml.safe_dump_all(configurations(webhook))
        cp.kubectl("apply", "--server-side", "-f", "-", input=hooks)
        extender = stack.enter_context(_extender(cp, folder))

        stack.enter_context(runtime.node_address())
        name = cluster.unique_name("real-node", max_len=30)
        kubelet = runtime.Kubelet(cp, containerd, name, labels={names.LABEL_ENABLED: "true"})
        stack.callback(kubelet.stop)
        kubelet.start()

        nvml = folder / "nvml.yaml"
        write_fake(nvml, [card(CARD_A, 0)])
        nvml.chmod(0o644)
        mps = FakeControl(folder)
        stack.callback(mps.kill_all)
        plugin = _start_device_plugin(folder, cp, name, nvml, mps)
        stack.callback(plugin.stop)

        node = RealNode(
            cp, containerd, kubelet, images, nvml, mps, plugin,
            parts={"webhook": webhook, "extender": extender},
        )  # fmt: skip
        try:
            cluster.wait_for(
                lambda: _node_ready(cp, name),
                timeout=120,
                interval=0.5,
                what="the node Ready with gpushare's memory units and report",
            )
        except TimeoutError as exc:
            logs = "\n".join(f"--- {k}\n{v}" for k, v in node.logs().items())
            raise runtime.NodeUnavailableError(f"{exc}\n{logs}") from exc
        yield node


def main() -> int:
    """Run the local cluster until Ctrl-C or SIGTERM; print its kubeconfig and stand-in image."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    folder = Path(tempfile.mkdtemp(prefix="gpushare-local-"))
    try:
        with start(folder) as node:
            print(
                f"node {node.name} is Ready with one fake H100 ({node.nvml_file}).\n"
                f"  export KUBECONFIG={node.cp.kubeconfig}\n"
                f"  vLLM stand-in image: {node.images['vllm-standin']}\n"
                f"  logs: {folder} and {node.containerd.workdir}\n"
                "Ctrl-C stops everything.",
                flush=True,
            )
            while True:
                signal.pause()
    except KeyboardInterrupt:
        return 0
    except (cluster.BinariesMissingError, runtime.NodeUnavailableError) as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
