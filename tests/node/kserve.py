"""KServe's controller manager on the `node` tests' cluster: the release ``tests/kserve/go.mod``
pins, built by ``tests/kserve/build.sh``, run as a process of this machine (as kube-controller-
manager is) in Standard mode (raw Deployments; no Knative, no Istio, no ingress), with its CRDs,
the stock vLLM and Hugging Face ClusterServingRuntimes, and its webhooks (InferenceService defaulter
and validator, the pod mutator, the runtimes' validators) called at ``https://127.0.0.1`` under a
CA of our own.

The seed's images (``docker.io/vllm/vllm-openai:latest``, ``docker.io/kserve/vllmserver:latest``)
are the vLLM stand-in, tagged under those names in containerd: nothing is pulled.
"""

import base64
import contextlib
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare.core import names
from tests import cluster
from tests.manifests import parts
from tests.node import runtime, workloads
from tests.node.vllm_standin import ENV_NVML
from tests.webhook import builders

BUILD: Final = Path(__file__).resolve().parents[1] / "kserve" / "build.sh"
NAMESPACE: Final = "kserve"
SEED_IMAGES: Final = ("docker.io/vllm/vllm-openai:latest", "docker.io/kserve/vllmserver:latest")
RUNTIMES: Final = ("kserve-vllmserver.yaml", "kserve-huggingfaceserver.yaml")
SMALL: Final = {
    "limits": {names.NVIDIA_GPU_RESOURCE: "1", "cpu": "200m", "memory": "256Mi"},
    "requests": {names.NVIDIA_GPU_RESOURCE: "1", "cpu": "10m", "memory": "64Mi"},
}
"""The seed's predictor resources, as two cores and a stand-in need them."""


def seed(nvml_file: Path, fixture: str, name: str, namespace: str, memory: str) -> dict[str, Any]:
    """A seed InferenceService (``tests/data/fixtures``) with gpushare's annotation, as this
    machine runs it: the images are the stand-in (tagged under the seed's names), the CPU and
    memory requests fit two cores, the fake card file is mounted for the stand-in, and
    ``STORAGE_URI`` (a PVC of the seed's cluster) is left out."""
    body = builders.isvc(fixture, memory=memory)
    body["metadata"].update(name=name, namespace=namespace)
    predictor = body["spec"]["predictor"]
    [container] = predictor["containers"]
    container["env"] = [e for e in container.get("env", []) if e["name"] != "STORAGE_URI"]
    container["env"].append({"name": ENV_NVML, "value": workloads.NVML_IN_CONTAINER})
    container["resources"] = copy.deepcopy(SMALL)
    container["volumeMounts"] = [
        {"name": "nvml", "mountPath": workloads.NVML_IN_CONTAINER, "readOnly": True}
    ]
    predictor["volumes"] = [{"name": "nvml", "hostPath": {"path": str(nvml_file), "type": "File"}}]
    return body


def build() -> Path:
    """Run ``tests/kserve/build.sh`` (a no-op when built): the folder with the manager and the
    release's CRDs, webhook configurations and ConfigMap."""
    result = subprocess.run(
        ["bash", str(BUILD)], capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        raise runtime.NodeUnavailableError(
            f"tests/kserve/build.sh failed:\n{result.stderr[-3000:]}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def _config_map(release: Path) -> dict[str, Any]:
    """The release's ``inferenceservice-config``, in Standard mode and creating no Ingress."""
    body: dict[str, Any] = yaml.safe_load(
        (release / "configmap" / "inferenceservice.yaml").read_text()
    )
    data = body["data"]
    data.pop("_example", None)
    data["deploy"] = json.dumps({"defaultDeploymentMode": "Standard"})
    ingress = json.loads(data["ingress"])
    ingress["disableIngressCreation"] = True
    data["ingress"] = json.dumps(ingress)
    body["metadata"]["namespace"] = NAMESPACE
    return body


def _webhooks(release: Path, port: int, ca: bytes) -> list[dict[str, Any]]:
    """The release's webhook configurations, calling the manager on this machine."""
    out = []
    for document in yaml.safe_load_all((release / "webhook" / "manifests.yaml").read_text()):
        if not document:
            continue
        body = copy.deepcopy(document)
        for hook in body["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca).decode(),
            }
        out.append(body)
    return out


@contextlib.contextmanager
def start(
    cp: cluster.ControlPlane, containerd: runtime.Containerd, standin: str, folder: Path
) -> Iterator[cluster.Process]:
    """Install KServe's CRDs, runtimes, ConfigMap and webhooks, and run its manager until exit."""
    release = build()
    for image in SEED_IMAGES:
        containerd.ctr("images", "tag", "--force", standin, image)
    parts.apply_crds(cp, sorted((release / "crd").glob("*.yaml")))
    cluster.create_namespace(cp, NAMESPACE)
    cp.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(_config_map(release)))
    # The manager's webhook server reads its pair from controller-runtime's default folder under
    # the temporary directory.
    certs = folder / "kserve-tmp" / "k8s-webhook-server" / "serving-certs"
    certs.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "certs", "--out", str(certs),
         "--dns", "127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    webhook_port, probe_port = cluster.free_port(), cluster.free_port()
    hooks = _webhooks(release, webhook_port, (certs / "ca.crt").read_bytes())
    process = cluster.Process(
        "kserve-manager",
        [
            str(release / "manager"),
            f"--webhook-port={webhook_port}",
            f"--health-probe-addr=127.0.0.1:{probe_port}",
            "--metrics-addr=0",
            "--leader-elect=false",
        ],
        folder / "kserve-manager.log",
        env={**os.environ, "KUBECONFIG": str(cp.kubeconfig), "TMPDIR": str(certs.parents[1]),
             "POD_NAMESPACE": NAMESPACE},
    )  # fmt: skip
    try:
        ready = f"http://127.0.0.1:{probe_port}/readyz"
        cluster.wait_for(
            lambda: cluster.answers(ready, process), timeout=120, interval=0.5,
            what="KServe's manager /readyz",
        )  # fmt: skip
        cp.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(hooks))
        for name in RUNTIMES:
            cp.kubectl("apply", "--server-side", "-f", str(parts.SHARED / "kserve" / name))
        yield process
    finally:
        process.stop()
