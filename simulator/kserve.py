"""The pod KServe's controller makes from an InferenceService (RawDeployment mode).

KServe unions the InferenceService's annotations onto the pod template (a short list is dropped),
labels the pod with its service, and builds the predictor container either from the
``spec.predictor.containers`` the user wrote or, in the ``model`` form, from the serving runtime's
container with the model's arguments and resources merged in. The ``kserve-vllmserver`` runtime
(``python -m vllm.entrypoints.openai.api_server``) is the one built in here.
"""

import copy
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from gpushare.simulator.workload import Manifest, Service

ISVC_LABEL: Final = "serving.kserve.io/inferenceservice"
CONTAINER: Final = "kserve-container"
DROPPED_ANNOTATIONS: Final = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        "autoscaling.knative.dev/class",
        "autoscaling.knative.dev/metric",
        "serving.kserve.io/deploymentMode",
    }
)
"""Annotations KServe keeps off the pod template."""

VLLM_RUNTIME: Final[Manifest] = {
    "name": CONTAINER,
    "image": "kserve/vllmserver:latest",
    "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
    "args": ["--port=8080", "--served-model-name={{.Name}}", "--model=/mnt/models"],
    "env": [{"name": "HF_HOME", "value": "/tmp"}, {"name": "VLLM_CONFIG_ROOT", "value": "/tmp"}],
    "resources": {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    },
}
"""The container of KServe's ``kserve-vllmserver`` ClusterServingRuntime."""

STORAGE_INITIALIZER: Final[Manifest] = {
    "name": "storage-initializer",
    "image": "kserve/storage-initializer:latest",
    "args": [],
    "resources": {
        "requests": {"cpu": "100m", "memory": "100Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    },
}


def predictor_pod(service: Service) -> Manifest:
    """The predictor pod for ``service``, as the apiserver receives it from KServe's Deployment."""
    isvc = service.manifest
    name = service.name
    annotations = {
        key: value
        for key, value in (isvc["metadata"].get("annotations") or {}).items()
        if key not in DROPPED_ANNOTATIONS
    }
    predictor: Mapping[str, Any] = isvc["spec"]["predictor"]
    spec: Manifest = {"containers": _containers(predictor, name)}
    model = predictor.get("model")
    if isinstance(model, Mapping) and model.get("storageUri"):
        initializer = copy.deepcopy(STORAGE_INITIALIZER)
        initializer["args"] = [str(model["storageUri"]), "/mnt/models"]
        spec["initContainers"] = [initializer]
    for key in ("nodeSelector", "tolerations", "serviceAccountName", "volumes"):
        if key in predictor:
            spec[key] = copy.deepcopy(predictor[key])
    digest = hashlib.sha256(f"{service.key}/{service.source}".encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-predictor-{digest[:10]}-{digest[10:15]}",
            "namespace": service.namespace,
            "labels": {
                ISVC_LABEL: name,
                "component": "predictor",
                "app": f"isvc.{name}-predictor",
            },
            "annotations": annotations,
        },
        "spec": spec,
    }


def _containers(predictor: Mapping[str, Any], name: str) -> list[Manifest]:
    if predictor.get("containers"):
        return [copy.deepcopy(dict(c)) for c in predictor["containers"]]
    model: Mapping[str, Any] = predictor["model"]
    container = copy.deepcopy(VLLM_RUNTIME)
    container["args"] = [arg.replace("{{.Name}}", name) for arg in container["args"]]
    container["args"] += [str(arg) for arg in model.get("args") or []]
    if model.get("resources"):
        container["resources"] = copy.deepcopy(dict(model["resources"]))
    if model.get("env"):
        container["env"] = [*container["env"], *copy.deepcopy(list(model["env"]))]
    return [container]
