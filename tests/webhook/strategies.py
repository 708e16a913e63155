"""Hypothesis strategies for the webhook: annotations, container specs, pods, AdmissionReviews."""

import shlex
import uuid
from typing import Any

from hypothesis import strategies as st

from gpushare.core import names

QUANTITY_TEXT = st.from_regex(
    r"\A[+-]?[0-9]{0,6}(\.[0-9]{0,3})?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]{1,2})?\Z"
)
ANNOTATION_VALUES = st.one_of(
    QUANTITY_TEXT,
    st.sampled_from(["20Gi", "1Gi", "0", "716Mi", "717Mi", "80Gi", "79Gi", " 20Gi ", "1e10"]),
    st.text(max_size=20),
)
ANNOTATION_KEYS = st.sampled_from(
    [
        names.ANNOTATION_GPU_MEMORY,
        names.ANNOTATION_POLICY,
        names.ANNOTATION_MUTATED,
        "gpushare.io/gpu_memory",
        "gpushare.io/gpu-mem",
        "gpushare/gpu-memory",
        "example.com/other",
    ]
)

FLAG_TOKENS = st.sampled_from(
    [
        "--gpu-memory-utilization",
        "--gpu_memory_utilization",
        "--gpu-memory-utilization=0.9",
        "--gpu-memory-util=0.5",
        names.VLLM_UTILIZATION_ARG,
        "0.9",
        "--port",
        "8080",
        "--model",
        "/mnt/models",
        "--tensor-parallel-size",
        "1",
        "-tp",
        "2",
        "--",
        "-0.5",
    ]
)
ARGS = st.lists(st.one_of(FLAG_TOKENS, st.text(min_size=1, max_size=8)), max_size=8)
SAFE_ARGS = st.lists(
    # '--' ends vLLM's flags: both forms refuse it (tested on its own), so it is no "safe" argument.
    st.one_of(FLAG_TOKENS, st.from_regex(r"\A[a-z0-9/.=$ '\"-]{1,8}\Z")).filter(
        lambda t: t != "--"
    ),
    max_size=8,
)

SERVER_COMMANDS = st.sampled_from(
    [
        ["vllm", "serve"],
        ["python", "-m", "vllm.entrypoints.openai.api_server"],
        ["python3", "-m", "vllm.entrypoints.api_server"],
        ["python", "train.py"],
    ]
)


@st.composite
def shell_commands(draw: st.DrawFn) -> list[str]:
    """``sh -c`` around a server command line, with some setup before it."""
    server = draw(SERVER_COMMANDS) + draw(SAFE_ARGS)
    before = draw(st.sampled_from(["", "exec ", "pip install x && ", "cd /tmp; ", "A=1 "]))
    after = draw(st.sampled_from(["", " > /tmp/log 2>&1", "; echo done", " | tee log"]))
    return [draw(st.sampled_from(["sh", "/bin/bash"])), "-c", before + shlex.join(server) + after]


COMMANDS = st.one_of(
    st.none(),
    SERVER_COMMANDS,
    shell_commands(),
    st.just(["sh", "-c", "vllm serve a & vllm serve b"]),
)

IMAGES = st.sampled_from(
    [
        "vllm/vllm-openai:latest",
        "docker.io/kserve/huggingfaceserver:v0.21.0",
        "kserve/sklearnserver:v0.21.0",
        "python:3.12",
        "nginx:1.27",
    ]
)
GPU_COUNTS = st.sampled_from([None, "0", "1", "1", "1", "2"])


@st.composite
def containers(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A valid container spec: any launch form, GPU count, flags and environment."""
    container: dict[str, Any] = {"name": name, "image": draw(IMAGES)}
    command = draw(COMMANDS)
    if command is not None:
        container["command"] = command
    if draw(st.booleans()):
        container["args"] = draw(SAFE_ARGS)
    gpus = draw(GPU_COUNTS)
    limits: dict[str, str] = {"cpu": "1"}
    if gpus is not None:
        limits[names.NVIDIA_GPU_RESOURCE] = gpus
    container["resources"] = {"limits": limits}
    if draw(st.booleans()):
        container["resources"]["requests"] = dict(limits)
    env = draw(
        st.lists(
            st.sampled_from(["HF_HOME", "VLLM_LOGGING_LEVEL", "CUDA_VISIBLE_DEVICES"]),
            max_size=2,
            unique=True,
        )
    )
    if env:
        container["env"] = [{"name": key, "value": "x"} for key in env]
    return container


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Pod carrying the gpushare annotation, with one to three containers."""
    names_ = draw(
        st.lists(
            st.sampled_from(["kserve-container", "server", "trainer", "sidecar"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    annotations = {
        names.ANNOTATION_GPU_MEMORY: draw(st.sampled_from(["2Gi", "20Gi", "20480Mi", "79Gi"]))
    }
    annotations.update(draw(st.dictionaries(ANNOTATION_KEYS, ANNOTATION_VALUES, max_size=2)))
    annotations[names.ANNOTATION_GPU_MEMORY] = draw(
        st.one_of(st.just(annotations[names.ANNOTATION_GPU_MEMORY]), ANNOTATION_VALUES)
    )
    spec: dict[str, Any] = {"containers": [draw(containers(name)) for name in names_]}
    if draw(st.booleans()):
        spec["schedulerName"] = draw(st.sampled_from(["default-scheduler", "volcano"]))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
        "spec": spec,
    }


def review(
    body: Any, *, resource: tuple[str, str, str] = ("", "v1", "pods"), operation: str = "CREATE"
) -> dict[str, Any]:
    """An AdmissionReview request as the apiserver sends it."""
    group, version, plural = resource
    kind = {"pods": "Pod", "inferenceservices": "InferenceService"}.get(plural, "Thing")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": plural},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": plural},
            "name": "p",
            "namespace": "ns",
            "operation": operation,
            "userInfo": {"username": "admin", "uid": "1", "groups": ["system:masters"]},
            "object": body,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """AdmissionReview envelopes, well-formed or not: any JSON, or a real one with a part broken."""
    base = review(draw(pods()))
    choice = draw(st.integers(min_value=0, max_value=4))
    if choice == 0:
        return draw(JSON)
    if choice == 1:
        base[draw(st.sampled_from(["apiVersion", "kind", "request"]))] = draw(JSON)
        return base
    request = base["request"]
    key = draw(st.sampled_from(sorted(request)))
    if choice == 2:
        del request[key]
    elif choice == 3:
        request[key] = draw(JSON)
    else:
        request["object"]["metadata"][
            draw(st.sampled_from(["annotations", "name", "uid", "labels"]))
        ] = draw(JSON)
    return base
