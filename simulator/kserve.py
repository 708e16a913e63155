"""The pods KServe's controller makes from an InferenceService (RawDeployment mode).

One builder for the simulator and the tests, following KServe's conventions:

- every component (``predictor``, ``transformer``, ``explainer``) runs in pods labelled with the
  service and the component; the InferenceService's annotations (less a short list KServe keeps
  off) and the component's own ``annotations`` are unioned onto them, so a gpushare annotation
  on the service reaches the transformer's pods too;
- each component's server container is named ``kserve-container``, the transformer's as well;
- a predictor is either the ``containers`` the user wrote or, in the ``model`` form, the serving
  runtime's container with ``{{.Name}}`` replaced, its placeholder image filled, the model's
  arguments appended, its environment merged and the model's resources; the
  ``kserve-vllmserver`` runtime (``python -m vllm.entrypoints.openai.api_server``) is built in;
- a transformer's container is told the model's name and where the predictor answers
  (``--model_name``, ``--predictor_host``, ``--http_port``);
- a ``storageUri`` (or a ``STORAGE_URI`` variable) brings the storage-initializer init container.
"""

import copy
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from gpushare.simulator.workload import Manifest, Service

ISVC_LABEL: Final = "serving.kserve.io/inferenceservice"
CONTAINER: Final = "kserve-container"
COMPONENTS: Final = ("predictor", "transformer", "explainer")
DROPPED_ANNOTATIONS: Final = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        "autoscaling.knative.dev/class",
        "autoscaling.knative.dev/metric",
        "serving.kserve.io/deploymentMode",
    }
)
"""Annotations KServe keeps off the pod template."""
HTTP_PORT: Final = "8080"

VLLM_RUNTIME: Final[Manifest] = {
    "apiVersion": "serving.kserve.io/v1alpha1",
    "kind": "ClusterServingRuntime",
    "metadata": {"name": "kserve-vllmserver"},
    "spec": {
        "containers": [
            {
                "name": CONTAINER,
                "image": "kserve/vllmserver:latest",
                "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
                "args": ["--port=8080", "--served-model-name={{.Name}}", "--model=/mnt/models"],
                "env": [
                    {"name": "HF_HOME", "value": "/tmp"},
                    {"name": "VLLM_CONFIG_ROOT", "value": "/tmp"},
                ],
                "resources": {
                    "requests": {"cpu": "1", "memory": "2Gi"},
                    "limits": {"cpu": "1", "memory": "2Gi"},
                },
            }
        ]
    },
}
"""KServe's ``kserve-vllmserver`` ClusterServingRuntime, as far as the pod shows it."""

RUNTIME_IMAGES: Final = {
    "vllmserver:replace": "docker.io/vllm/vllm-openai:v0.24.0",
    "huggingfaceserver:replace": "docker.io/kserve/huggingfaceserver:v0.21.0-gpu",
}
"""KServe fills each runtime's placeholder image from its configuration; these are what it would."""

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
    digest = hashlib.sha256(f"{service.key}/{service.source}".encode()).hexdigest()
    name = f"{service.name}-predictor-{digest[:10]}-{digest[10:15]}"
    pod = component_pod(service.manifest, name=name)
    pod["metadata"]["namespace"] = service.namespace
    return pod


def component_pod(
    isvc: Manifest,
    component: str = "predictor",
    *,
    runtime: Manifest | None = None,
    name: str | None = None,
) -> Manifest:
    """The pod of one component of ``isvc`` (``generateName`` unless ``name`` is given).

    ``runtime`` is the serving runtime of a ``model``-form predictor (the built-in vLLM runtime
    when none is given).
    """
    metadata = isvc["metadata"]
    service = str(metadata["name"])
    spec: Mapping[str, Any] = isvc["spec"][component]
    annotations = {
        key: value
        for key, value in (metadata.get("annotations") or {}).items()
        if key not in DROPPED_ANNOTATIONS
    }
    volumes: list[Manifest] = copy.deepcopy(list(spec.get("volumes") or []))
    if spec.get("containers"):
        containers = [copy.deepcopy(dict(c)) for c in spec["containers"]]
        storage = next(
            (e.get("value") for e in containers[0].get("env") or [] if e["name"] == "STORAGE_URI"),
            None,
        )
    else:
        runtime = runtime or VLLM_RUNTIME
        containers = [_runtime_container(spec["model"], runtime["spec"], service)]
        annotations.update(runtime["spec"].get("annotations") or {})
        volumes += copy.deepcopy(list(runtime["spec"].get("volumes") or []))
        storage = spec["model"].get("storageUri")
    annotations.update(spec.get("annotations") or {})
    if component == "transformer":
        predictor_host = f"{service}-predictor.{metadata.get('namespace') or 'default'}"
        containers[0]["args"] = [
            *(containers[0].get("args") or []),
            *("--model_name", service, "--predictor_host", predictor_host),
            *("--http_port", HTTP_PORT),
        ]
    pod_spec: Manifest = {"containers": containers}
    if storage:
        initializer = copy.deepcopy(STORAGE_INITIALIZER)
        initializer["args"] = [str(storage), "/mnt/models"]
        pod_spec["initContainers"] = [initializer]
    for key in ("nodeSelector", "tolerations", "serviceAccountName"):
        if key in spec:
            pod_spec[key] = copy.deepcopy(spec[key])
    if volumes:
        pod_spec["volumes"] = volumes
    named = {"name": name} if name else {"generateName": f"{service}-{component}-"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **named,
            "namespace": metadata.get("namespace", "default"),
            "labels": {
                ISVC_LABEL: service,
                "component": component,
                "app": f"isvc.{service}-{component}",
            },
            "annotations": annotations,
        },
        "spec": pod_spec,
    }


def _runtime_container(model: Mapping[str, Any], runtime: Mapping[str, Any], name: str) -> Manifest:
    """The runtime's ``kserve-container`` merged with the model spec, as KServe merges them."""
    container: Manifest = copy.deepcopy(dict(runtime["containers"][0]))
    image = str(container.get("image") or "")
    container["image"] = RUNTIME_IMAGES.get(image, image)
    container["args"] = [
        *(str(arg).replace("{{.Name}}", name) for arg in container.get("args") or []),
        *(str(arg) for arg in model.get("args") or []),
    ]
    if model.get("env"):
        container["env"] = [*(container.get("env") or []), *copy.deepcopy(list(model["env"]))]
    if model.get("resources"):
        container["resources"] = copy.deepcopy(dict(model["resources"]))
    return container
