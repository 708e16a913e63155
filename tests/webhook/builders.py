"""Test objects: the shared InferenceService fixtures and the pods KServe would make of them.

The pods come from the simulator's builder (:mod:`gpushare.simulator.kserve`), which follows
KServe's conventions for every component; the InferenceServices here are the shapes people write:
the seed fixtures, the ``model`` form, a transformer beside the predictor, a text-generation-
inference predictor, vLLM behind init wrappers and a shell, a flag split across command and args.

The ``kserve`` Python SDK is not used to build InferenceServices: it pins ``protobuf<7``,
``grpcio-tools<1.82`` and ``pandas<3`` (and pulls fastapi, uvicorn and a dozen more), which would
downgrade what the device plugin's generated gRPC stubs need. The objects are plain dicts instead,
checked against the InferenceService CRD's own OpenAPI schema (``isvc_schema``) and by the real
apiserver with the CRD installed.
"""

import copy
import functools
import os
from pathlib import Path
from typing import Any, Final

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gpushare.core import config, names
from gpushare.simulator import kserve
from gpushare.webhook import mutation

_Loader: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SHARED: Final = Path(__file__).resolve().parents[1] / "data"
KUBERNETES_VERSION: Final = "1.36"

FIXTURES: Final = ("isvc-vllm-api-server.yaml", "isvc-vllm-openai.yaml")


def shared(*parts: str) -> Path:
    """A path under tests/data; skip (fail under CI) when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (the KServe test data)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def load(*parts: str) -> dict[str, Any]:
    """One YAML document from the shared folder."""
    data: dict[str, Any] = yaml.safe_load(shared(*parts).read_text())
    return data


def isvc(fixture: str, *, memory: str | None = "20Gi", **annotations: str) -> dict[str, Any]:
    """A shared InferenceService fixture with the gpushare annotation (and any others) added."""
    body = load("fixtures", fixture)
    values = dict(annotations)
    if memory is not None:
        values[names.ANNOTATION_GPU_MEMORY] = memory
    if values:
        body["metadata"].setdefault("annotations", {}).update(values)
    return body


def model_isvc(
    name: str, *, model_format: str, args: list[str], memory: str = "20Gi", gpus: str = "1"
) -> dict[str, Any]:
    """An InferenceService in KServe's ``model`` form (the runtime is chosen by model format)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": "kserve-test",
            "annotations": {names.ANNOTATION_GPU_MEMORY: memory},
        },
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": model_format},
                    "storageUri": "pvc://task-pv-claim/bloom-560m",
                    "args": args,
                    "resources": {
                        "limits": {"cpu": "4", "memory": "16Gi", names.NVIDIA_GPU_RESOURCE: gpus},
                        "requests": {"cpu": "4", "memory": "16Gi", names.NVIDIA_GPU_RESOURCE: gpus},
                    },
                }
            }
        },
    }


def predictor_pod(isvc: dict[str, Any], runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """The predictor pod KServe's controller (raw deployment mode) would create for ``isvc``."""
    return kserve.component_pod(isvc, "predictor", runtime=runtime)


def transformer_pod(isvc: dict[str, Any]) -> dict[str, Any]:
    """The transformer pod KServe's controller would create for ``isvc``."""
    return kserve.component_pod(isvc, "transformer")


def custom_isvc(
    name: str, container: dict[str, Any], *, memory: str | None = "20Gi"
) -> dict[str, Any]:
    """An InferenceService whose predictor is one custom ``kserve-container``."""
    server = {"name": kserve.CONTAINER, **container}
    server.setdefault(
        "resources",
        {
            "limits": {"cpu": "4", "memory": "16Gi", names.NVIDIA_GPU_RESOURCE: "1"},
            "requests": {"cpu": "4", "memory": "16Gi", names.NVIDIA_GPU_RESOURCE: "1"},
        },
    )
    annotations = {} if memory is None else {names.ANNOTATION_GPU_MEMORY: memory}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "kserve-test", "annotations": annotations},
        "spec": {"predictor": {"containers": [server]}},
    }


def with_transformer(isvc: dict[str, Any]) -> dict[str, Any]:
    """``isvc`` with a CPU transformer (KServe's image-transformer example) in front of it."""
    body = copy.deepcopy(isvc)
    body["spec"]["transformer"] = {
        "containers": [
            {
                "name": kserve.CONTAINER,
                "image": "kserve/image-transformer:v0.21.0",
                "resources": {
                    "limits": {"cpu": "1", "memory": "2Gi"},
                    "requests": {"cpu": "100m", "memory": "256Mi"},
                },
            }
        ]
    }
    return body


def tgi_isvc(memory: str = "20Gi") -> dict[str, Any]:
    """A text-generation-inference predictor: a GPU server that is not vLLM."""
    return custom_isvc(
        "tgi",
        {
            "image": "ghcr.io/huggingface/text-generation-inference:3.3.4",
            "args": ["--model-id", "/mnt/models", "--port", "8080"],
        },
        memory=memory,
    )


WRAPPED = {
    "tini sh -c": ["tini", "--", "sh", "-c", "exec vllm serve /mnt/models --port 8080"],
    "env bash -c": ["/usr/bin/env", "bash", "-c", "exec vllm serve /mnt/models --port 8080"],
    "dumb-init": ["dumb-init", "--single-child", "vllm", "serve", "/mnt/models"],
    "exec chain": ["sh", "-c", "cd /tmp && exec env A=1 vllm serve /mnt/models --port 8080"],
}
"""vLLM started behind init programs, ``env`` and shells, as hand-written runtimes do."""


def wrapped_isvc(command: list[str]) -> dict[str, Any]:
    """A vLLM predictor started through ``command``."""
    return custom_isvc(
        "wrapped", {"image": "docker.io/vllm/vllm-openai:v0.24.0", "command": command}
    )


def split_flag_isvc() -> dict[str, Any]:
    """A predictor whose command ends with the flag and whose args start with its value."""
    return custom_isvc(
        "split",
        {
            "image": "docker.io/vllm/vllm-openai:v0.24.0",
            "command": ["vllm", "serve", "/mnt/models", "--gpu-memory-utilization"],
            "args": ["0.9", "--port", "8080"],
        },
    )


def job_pod(memory: str = "12Gi") -> dict[str, Any]:
    """A fine-tuning Job's pod: one GPU container that does not run vLLM."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "finetune-",
            "labels": {"job-name": "finetune"},
            "annotations": {names.ANNOTATION_GPU_MEMORY: memory},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                    "command": ["python", "train.py", "--epochs", "3"],
                    "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                }
            ],
        },
    }


def deployment(memory: str = "16Gi") -> dict[str, Any]:
    """A plain Deployment that runs ``vllm serve`` with a user utilization of its own."""
    template = {
        "metadata": {
            "labels": {"app": "chat"},
            "annotations": {names.ANNOTATION_GPU_MEMORY: memory},
        },
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "vllm/vllm-openai:v0.24.0",
                    "command": ["vllm", "serve"],
                    "args": [
                        "Qwen/Qwen2.5-0.5B-Instruct",
                        "--gpu-memory-utilization",
                        "0.9",
                        "--port",
                        "8000",
                    ],
                    "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                },
                {"name": "metrics-proxy", "image": "nginx:1.27"},
            ]
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "chat"}}, "template": template},
    }


def pod_of(template_owner: dict[str, Any]) -> dict[str, Any]:
    """The pod a controller would create from a Deployment's (or Job's) template."""
    template = copy.deepcopy(template_owner["spec"]["template"])
    name = template_owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "generateName": f"{name}-"},
        "spec": template["spec"],
    }


def apply(body: dict[str, Any], ops: Any) -> dict[str, Any]:
    """``body`` with a JSON patch applied (a copy)."""
    patched: dict[str, Any] = jsonpatch.apply_patch(body, list(ops), in_place=False)
    return patched


def check_pod(pod: dict[str, Any]) -> None:
    """Raise unless ``pod`` is a valid Pod for Kubernetes' published schema."""
    named = copy.deepcopy(pod)
    named["metadata"].setdefault("name", named["metadata"].get("generateName", "p") + "x")
    kubernetes_validate.validate(named, KUBERNETES_VERSION, strict=True)


@functools.cache
def isvc_validator() -> jsonschema.Draft7Validator:
    """A validator for the v1beta1 OpenAPI schema of KServe's InferenceService CRD."""
    crd = yaml.load(
        shared("kserve", "serving.kserve.io_inferenceservices.yaml").read_text(), Loader=_Loader
    )
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def check_isvc(body: dict[str, Any]) -> None:
    """Raise unless ``body`` satisfies the InferenceService CRD's schema."""
    isvc_validator().validate(body)


H100: Final = (81_559 - 479) * 1024**2
"""An H100 80GB's CUDA total (NVML's 81,559 MiB less the 479 MiB the driver reserves)."""
EXTENDER: Final = config.Settings()
"""The default settings: ``backend: extender``."""


def mutate(
    pod: dict[str, Any], settings: config.Settings = EXTENDER, *, largest: int | None = H100
) -> mutation.Mutation:
    """The webhook's Pod mutation, the largest card in the cluster ``largest`` CUDA bytes."""
    return mutation.pod(pod, settings=settings, largest_cuda_total_bytes=largest)


def mutated(pod: dict[str, Any], settings: config.Settings = EXTENDER) -> dict[str, Any]:
    """``pod`` as the webhook leaves it, checked against Kubernetes' schema."""
    result = mutate(pod, settings)
    assert result.allowed, result.message
    after = apply(pod, result.patch)
    check_pod(after)
    return after
