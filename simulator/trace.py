"""The built-in trace: about sixty vLLM InferenceServices of the sizes an inference cluster runs.

Public model shapes from 0.5B to 72B parameters (:data:`gpushare.simulator.models.CATALOG`), in
bf16 and 8-bit (fp8 online quantization, int8 w8a8 checkpoints), with context lengths from 4k to
32k and batch limits from 4 to 32 sequences. Each is sized by ``gpushare estimate`` and asks for
exactly what the estimate says, as a user who pasted its annotation line would. Half are written in
KServe's custom-container form (the ``vllm/vllm-openai`` image), half in the ``model`` form with the
``kserve-vllmserver`` runtime; a few carry a hand-tuned ``--gpu-memory-utilization`` that the
webhook must replace.
"""

import itertools
import random
from dataclasses import dataclass
from typing import Final

from gpushare.core import names
from gpushare.simulator import estimate, models
from gpushare.simulator.workload import Manifest, Service


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of service in the trace."""

    model: str
    """A key of :data:`models.CATALOG`."""
    repository: str
    """The Hugging Face repository it is served from."""
    quantization: str | None
    max_model_len: int
    max_num_seqs: int
    count: int

    @property
    def weights(self) -> str:
        return self.quantization or "bf16"


KINDS: Final = (
    Kind("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", None, 4096, 16, 6),
    Kind("Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", None, 4096, 8, 3),
    Kind("Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", None, 8192, 32, 5),
    Kind("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", None, 8192, 16, 5),
    Kind("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", "fp8", 16384, 8, 3),
    Kind("Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct", None, 8192, 16, 4),
    Kind("Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", None, 16384, 8, 4),
    Kind("Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", None, 8192, 16, 5),
    Kind("Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "fp8", 32768, 4, 3),
    Kind("Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", None, 16384, 8, 4),
    Kind("Qwen2.5-7B", "RedHatAI/Qwen2.5-7B-Instruct-quantized.w8a8", "int8", 8192, 32, 3),
    Kind("Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", None, 8192, 16, 3),
    Kind("Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct", None, 8192, 8, 3),
    Kind("Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct", "fp8", 16384, 8, 2),
    Kind("Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct", "fp8", 8192, 8, 3),
    Kind("Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct", None, 4096, 8, 1),
    Kind("Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "fp8", 4096, 4, 2),
    Kind("Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct", "fp8", 4096, 4, 1),
)
"""60 services: many small models, a middle of 7B to 14B, a few that nearly fill an 80 GB card."""

TEAMS: Final = ("chat", "search", "agents", "eval")
"""Namespaces the services are spread over."""
HAND_TUNED: Final = "0.9"
"""The ``--gpu-memory-utilization`` every third custom-container service carries from before."""


def builtin(*, reserve_bytes: int, unit_bytes: int, seed: int = 0) -> list[Service]:
    """The trace, in an arrival order shuffled by ``seed``."""
    services: list[Service] = []
    serial = itertools.count()
    for kind in KINDS:
        sized = estimate.estimate(
            models.CATALOG[kind.model],
            reserve_bytes=reserve_bytes,
            unit_bytes=unit_bytes,
            quantization=kind.quantization,
            max_model_len=kind.max_model_len,
            max_num_seqs=kind.max_num_seqs,
        )
        for copy in range(1, kind.count + 1):
            n = next(serial)
            name = _name(kind, copy)
            label = (
                f"{kind.model} {kind.weights}, {kind.max_model_len // 1024}k ctx,"
                f" {kind.max_num_seqs} seqs"
            )
            manifest = _manifest(kind, name, TEAMS[n % len(TEAMS)], sized.quantity, n)
            services.append(
                Service(manifest, "built-in", label, minimum_budget_bytes=_least_budget(sized))
            )
    random.Random(seed).shuffle(services)
    return services


def _least_budget(sized: estimate.Estimate) -> int:
    """What vLLM needs in its budget to start: all but the KV cache, plus one full sequence."""
    blocks = -(-sized.max_model_len // estimate.KV_BLOCK_TOKENS)
    one_sequence = blocks * estimate.KV_BLOCK_TOKENS * sized.kv_bytes_per_token
    return sized.weights_bytes + sized.activation_bytes + sized.cuda_graph_bytes + one_sequence


def _name(kind: Kind, copy: int) -> str:
    slug = kind.model.lower().replace(".", "-").replace("_", "-")
    variant = f"-{kind.quantization}" if kind.quantization else ""
    return f"{slug}{variant}-{kind.max_model_len // 1024}k-{copy}"


def _vllm_args(kind: Kind) -> list[str]:
    args = [f"--max-model-len={kind.max_model_len}", f"--max-num-seqs={kind.max_num_seqs}"]
    if kind.quantization == "fp8":
        args.append("--quantization=fp8")
    return args


def _manifest(kind: Kind, name: str, namespace: str, quantity: str, n: int) -> Manifest:
    resources = {
        "limits": {"cpu": "4", "memory": "24Gi", names.NVIDIA_GPU_RESOURCE: "1"},
        "requests": {"cpu": "2", "memory": "16Gi", names.NVIDIA_GPU_RESOURCE: "1"},
    }
    predictor: Manifest
    if n % 2 == 0:
        args = ["--port", "8080", "--model", kind.repository, *_vllm_args(kind)]
        if n % 3 == 0:
            args += [names.VLLM_UTILIZATION_FLAG, HAND_TUNED]
        predictor = {
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "vllm/vllm-openai:latest",
                    "args": args,
                    "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
                    "resources": resources,
                }
            ]
        }
    else:
        predictor = {
            "model": {
                "modelFormat": {"name": "vLLM"},
                "runtime": "kserve-vllmserver",
                "storageUri": f"hf://{kind.repository}",
                "args": _vllm_args(kind),
                "resources": resources,
            }
        }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {names.ANNOTATION_GPU_MEMORY: quantity},
            "labels": {"team": namespace},
        },
        "spec": {"predictor": predictor},
    }
