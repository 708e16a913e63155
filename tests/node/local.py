"""A local cluster on a real kubelet without a GPU: a control plane with kube-controller-manager
and the cluster's own kube-scheduler, the real kubelet on containerd, and gpushare installed the way
an admin installs it: ``kubectl apply -k`` of ``tests/node/overlay`` (``manifests/`` with the
locally built images, and a fake NVML file of one H100 and the MPS control stand-in for the device
plugin), so that the webhook, the gpushare-scheduler with its extender sidecar and the device-plugin
DaemonSet run as pods under the real kubelet.

No kube-proxy runs here: :func:`runtime.service_route` writes the one rule it would write for the
``kubernetes`` Service, so that pods reach the apiserver in-cluster; the apiserver reaches the
webhook's Service through its endpoints (``--enable-aggregator-routing``).

:func:`start` runs it for the `node` tests; ``python -m tests.node.local`` (as root, after
``tests/controlplane/build.sh`` and ``tests/node/images.sh``; ``tests/node/up.sh`` does all three)
runs it until Ctrl-C and prints how to reach it.
"""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare.core import dra, names
from tests import cluster
from tests.deviceplugin.conftest import CARD_A, FakeControl, card, write_fake
from tests.manifests.parts import install_kserve_crds
from tests.node import kserve, runtime, workloads

OVERLAY: Final = Path(__file__).resolve().parent / "overlay"
HOST_FOLDER: Final = Path("/run/gpushare-test")
"""The fake NVML file and the MPS control stand-in, mounted into the device plugin's pod."""
CONTROLLERS: Final = (
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "job-controller",
    "cronjob-controller",
    "disruption-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "node-lifecycle-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "resourceclaim-controller",
)
"""What turns Deployments, DaemonSets and Jobs into pods, gives Services their endpoints, deletes
what owners and namespaces owned, lets a new node take pods, and makes the ResourceClaims of pods
that name a ResourceClaimTemplate (the DRA backend)."""
DEPLOYMENTS: Final = ("gpushare-webhook", "gpushare-scheduler")
DAEMONSET: Final = "gpushare-device-plugin"


@dataclass
class RealNode:
    """The running cluster of the `node` tests."""

    cp: cluster.ControlPlane
    containerd: runtime.Containerd
    kubelet: runtime.Kubelet
    images: dict[str, str]
    """Reference of each image by name: gpushare, vllm-standin, pause, kube-scheduler."""
    nvml_file: Path
    mps: FakeControl

    @property
    def name(self) -> str:
        return self.kubelet.name

    def system_pods(self, app: str) -> list[dict[str, Any]]:
        """gpushare's pods of one part (``app.kubernetes.io/name``), not being deleted."""
        items = self.cp.rest().get(
            f"/api/v1/namespaces/{names.NAMESPACE}/pods",
            labelSelector=f"app.kubernetes.io/name={app}",
        )["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def logs(self) -> dict[str, str]:
        """The tails of kubelet's, containerd's and every gpushare container's logs."""
        out = {"kubelet": self.kubelet.log(60), "containerd": self.containerd.log(30)}
        pods = self.cp.rest().get(f"/api/v1/namespaces/{names.NAMESPACE}/pods")["items"]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                name = f"{pod['metadata']['name']}/{container['name']}"
                result = self.cp.kubectl(
                    "logs", "-n", names.NAMESPACE, pod["metadata"]["name"], "-c",
                    container["name"], "--tail=30", check=False,
                )  # fmt: skip
                out[name] = result.stdout or result.stderr
        return out


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


def _installed(cp: cluster.ControlPlane) -> bool:
    """The parts' Deployments and DaemonSet available, and the webhook's CA bundle in place."""
    apps = f"/apis/apps/v1/namespaces/{names.NAMESPACE}"
    try:
        for name in DEPLOYMENTS:
            status = cp.rest().get(f"{apps}/deployments/{name}").get("status", {})
            if status.get("availableReplicas", 0) < 1:
                return False
        status = cp.rest().get(f"{apps}/daemonsets/{DAEMONSET}").get("status", {})
        if status.get("numberAvailable", 0) < 1:
            return False
        hooks = cp.rest().get(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/gpushare-webhook"
        )
    except cluster.ApiError:
        return False
    return all(h["clientConfig"].get("caBundle") for h in hooks["webhooks"])


def install(cp: cluster.ControlPlane, images: dict[str, str], folder: Path) -> None:
    """``kubectl apply -k`` the overlay with the built images: the product as an admin installs
    it. Returns once every part runs and the webhook answers."""
    top = folder / "install"
    top.mkdir()
    replaced = []
    for name, built in (
        ("gpushare", images["gpushare"]),
        ("registry.k8s.io/kube-scheduler", images["kube-scheduler"]),
    ):
        new_name, _, tag = built.rpartition(":")
        replaced.append({"name": name, "newName": new_name, "newTag": tag})
    top.joinpath("kustomization.yaml").write_text(
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(OVERLAY, top)],
            "images": replaced,
        })
    )  # fmt: skip
    cp.kubectl("apply", "--server-side", "-k", str(top), timeout=120)
    cluster.wait_for(
        lambda: _installed(cp),
        timeout=240,
        interval=1,
        what="gpushare's pods available and the webhook's certificate installed",
    )


def _agent_ready(cp: cluster.ControlPlane, node: str) -> bool:
    """The node's one agent pod Ready (its readiness probe: registered with kubelet and, under
    DRA, its ResourceSlice written)."""
    items = cp.rest().get(
        f"/api/v1/namespaces/{names.NAMESPACE}/pods",
        labelSelector=f"app.kubernetes.io/name={DAEMONSET}",
        fieldSelector=f"spec.nodeName={node}",
    )["items"]
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return len(live) == 1 and workloads.ready(live[0])


def replace_agent(node: RealNode, *, timeout: float = 120) -> None:
    """Delete the node's agent pod (a DaemonSet rollout, an eviction) and wait until the
    DaemonSet's new one is Ready."""
    [old] = node.system_pods(DAEMONSET)
    node.cp.rest().delete(f"/api/v1/namespaces/{names.NAMESPACE}/pods/{old['metadata']['name']}")

    def replaced() -> bool:
        pods = node.system_pods(DAEMONSET)
        fresh = [p for p in pods if p["metadata"]["uid"] != old["metadata"]["uid"]]
        return len(pods) == 1 and bool(fresh) and workloads.ready(fresh[0])

    cluster.wait_for(replaced, timeout=timeout, interval=1, what="a new agent pod Ready")


def _restart_agent(cp: cluster.ControlPlane, node: str, backend: str) -> None:
    """Label the node ``gpushare.io/backend=<backend>`` and delete its agent pod (waiting until it
    is gone): the DaemonSet's next pod reads the label at start-up."""
    cp.kubectl("label", "node", node, f"{names.LABEL_BACKEND}={backend}", "--overwrite")
    cp.kubectl(
        "delete", "pod", "-n", names.NAMESPACE, "-l", f"app.kubernetes.io/name={DAEMONSET}",
        f"--field-selector=spec.nodeName={node}", "--wait=true", "--timeout=60s", timeout=90,
    )  # fmt: skip


@contextlib.contextmanager
def on_dra(node: RealNode) -> Iterator[None]:
    """The node moved to the DRA backend the way docs/install.md says, and back on exit.

    To DRA: label it, restart its agent (which refuses to start until kubelet has zeroed the
    device plugin's ``gpushare.io/gpu-memory``), and wait for the agent Ready: its ResourceSlice
    written and the real kubelet's plugin watcher through registration. Back: relabel, restart,
    delete the slice (the extender's agent refuses while it exists) and wait for the node's
    units and report. The caller removes its DRA pods first (drained, as the docs say).
    """
    cp = node.cp
    _restart_agent(cp, node.name, "dra")
    try:
        cluster.wait_for(
            lambda: _agent_ready(cp, node.name), timeout=240, interval=1,
            what="the DRA agent Ready (its ResourceSlice written, registered with kubelet)",
        )  # fmt: skip
        yield
    finally:
        _restart_agent(cp, node.name, "extender")
        cp.kubectl("delete", "resourceslice", dra.slice_name(node.name), "--ignore-not-found")
        cluster.wait_for(
            lambda: _node_ready(cp, node.name) and _agent_ready(cp, node.name), timeout=240,
            interval=1, what="the node back on the extender backend, its units offered",
        )  # fmt: skip


@contextlib.contextmanager
def _host_folders() -> Iterator[Path]:
    """:data:`HOST_FOLDER`, new; :data:`runtime.MPS_ROOT` empty before and after (the node is
    alone on the machine: :func:`runtime.node_lock`)."""
    for folder in (HOST_FOLDER, runtime.MPS_ROOT):
        shutil.rmtree(folder, ignore_errors=True)
    HOST_FOLDER.mkdir(parents=True)
    try:
        yield HOST_FOLDER
    finally:
        for folder in (HOST_FOLDER, runtime.MPS_ROOT):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def start(folder: Path) -> Iterator[RealNode]:
    """Start it all (files under ``folder``); stop it all, containers included, on exit.

    Raises :class:`runtime.NodeUnavailableError` when the machine lacks what it needs.
    """
    bin_dir = cluster.find_binaries()
    runtime.check_machine(bin_dir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(runtime.node_lock())
        built = runtime.build_images(bin_dir)
        images = {name: ref for name, (_, ref) in built.items()}
        control_plane = cluster.ControlPlane(bin_dir, apiserver_args=runtime.APISERVER_ARGS)
        cp = stack.enter_context(control_plane)
        kcm = cp.start_controller_manager(CONTROLLERS)
        stack.callback(kcm.stop)
        # The cluster's own scheduler: it places gpushare's pods; the gpushare-scheduler (a pod)
        # places the annotated ones.
        stack.enter_context(cp.start_scheduler())
        runtime.claim_kubelet_dir()
        stack.callback(runtime.release_kubelet_dir)
        containerd = stack.enter_context(
            runtime.Containerd(runtime.build_containerd(), images["pause"])
        )
        for archive, _ in built.values():
            containerd.import_image(archive)
        install_kserve_crds(cp)

        stack.enter_context(runtime.node_address())
        stack.enter_context(runtime.service_route(cp.port))
        host = stack.enter_context(_host_folders())
        nvml = host / "nvml.yaml"
        write_fake(nvml, [card(CARD_A, 0)])
        nvml.chmod(0o644)
        mps = FakeControl(host)
        stack.callback(mps.kill_all)

        name = cluster.unique_name("real-node", max_len=30)
        kubelet = runtime.Kubelet(cp, containerd, name, labels={names.LABEL_ENABLED: "true"})
        stack.callback(kubelet.stop)
        kubelet.start()
        node = RealNode(cp, containerd, kubelet, images, nvml, mps)
        try:
            install(cp, images, folder)
            cluster.wait_for(
                lambda: _node_ready(cp, name),
                timeout=120,
                interval=0.5,
                what="the node Ready with gpushare's memory units and report",
            )
        except (TimeoutError, cluster.KubectlError) as exc:
            state = cp.kubectl("get", "all,events", "-A", "-o", "wide", check=False).stdout
            logs = "\n".join(f"--- {k}\n{v}" for k, v in node.logs().items())
            raise runtime.NodeUnavailableError(f"{exc}\n{state}\n{logs}") from exc
        yield node


def main() -> int:
    """Run the local cluster until Ctrl-C or SIGTERM; print its kubeconfig and stand-in image."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    folder = Path(tempfile.mkdtemp(prefix="gpushare-local-"))
    try:
        with contextlib.ExitStack() as stack:
            node = stack.enter_context(start(folder))
            standin = node.images["vllm-standin"]
            stack.enter_context(kserve.start(node.cp, node.containerd, standin, folder))
            example = folder / "bloom.yaml"
            body = kserve.seed(node.nvml_file, "isvc-vllm-openai.yaml", "bloom", "default", "20Gi")
            example.write_text(yaml.safe_dump(body, sort_keys=False))
            print(
                f"node {node.name} is Ready with one fake H100 ({node.nvml_file}), and KServe's"
                " controller runs.\n"
                f"  export KUBECONFIG={node.cp.kubeconfig}\n"
                f"  kubectl apply -f {example}    # the seed's InferenceService, 20Gi\n"
                "  kubectl get inferenceservice bloom    # READY True within a minute\n"
                f"  vLLM stand-in image: {standin}\n"
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
