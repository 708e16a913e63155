"""The Pod mutation on the pods KServe, a Deployment and a Job would create."""

import copy
from typing import Any

import pytest

from gpushare import config, names
from gpushare.webhook import mutation
from tests.webhook import builders

OURS = names.VLLM_UTILIZATION_ARG
SETTINGS = config.Settings()
H100 = (81_559 - 479) * 1024**2
"""An H100 80GB's CUDA total (NVML's 81,559 MiB less the 479 MiB the driver reserves)."""


def mutate(pod: dict[str, Any], *, largest: int | None = H100) -> mutation.Mutation:
    return mutation.pod(pod, settings=SETTINGS, largest_cuda_total_bytes=largest)


def mutated(pod: dict[str, Any]) -> dict[str, Any]:
    result = mutate(pod)
    assert result.allowed, result.message
    after = builders.apply(pod, result.patch)
    builders.check_pod(after)
    return after


def kserve_pods() -> list[tuple[str, dict[str, Any]]]:
    vllm_runtime = builders.load("kserve", "kserve-vllmserver.yaml")
    hf_runtime = builders.load("kserve", "kserve-huggingfaceserver.yaml")
    return [
        ("api_server fixture", builders.predictor_pod(builders.isvc("isvc-vllm-api-server.yaml"))),
        ("vllm-openai fixture", builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))),
        (
            "kserve-vllmserver runtime",
            builders.predictor_pod(
                builders.model_isvc(
                    "bloom", model_format="vLLM", args=["--gpu-memory-utilization=0.9"]
                ),
                vllm_runtime,
            ),
        ),
        (
            "huggingface runtime, vLLM backend",
            builders.predictor_pod(
                builders.model_isvc(
                    "qwen", model_format="huggingface", args=["--backend=vllm", "--model_id=q"]
                ),
                hf_runtime,
            ),
        ),
    ]


@pytest.fixture(params=range(4), ids=["api_server", "vllm-openai", "vllmserver", "hf-vllm"])
def kserve_pod(request: pytest.FixtureRequest) -> dict[str, Any]:
    pod: dict[str, Any] = kserve_pods()[request.param][1]
    return pod


def test_kserve_pods_get_the_grant_the_argument_and_the_scheduler(
    kserve_pod: dict[str, Any],
) -> None:
    after = mutated(kserve_pod)
    server = after["spec"]["containers"][0]
    assert server["name"] == "kserve-container"
    for kind in ("limits", "requests"):
        assert server["resources"][kind][names.RESOURCE_GPU_MEMORY] == "20"
        assert names.NVIDIA_GPU_RESOURCE not in server["resources"][kind]
    argv = (server.get("command") or []) + server["args"]
    assert argv[-1] == OURS
    assert not any(a.startswith("--gpu-memory-utilization=0") for a in argv)
    assert after["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert after["metadata"]["annotations"][names.ANNOTATION_MUTATED] == "20"
    assert not any(env["name"] == names.ENV_VLLM_UTILIZATION for env in server.get("env", [])), (
        "the variable must come from the device plugin, never the pod spec"
    )


def test_other_resources_and_fields_are_kept(kserve_pod: dict[str, Any]) -> None:
    before = kserve_pod["spec"]["containers"][0]
    after = mutated(kserve_pod)["spec"]["containers"][0]
    for kind in ("limits", "requests"):
        kept = {k: v for k, v in (before.get("resources") or {}).get(kind, {}).items()}
        kept.pop(names.NVIDIA_GPU_RESOURCE, None)
        assert {k: v for k, v in after["resources"][kind].items() if k in kept} == kept
    assert after.get("env") == before.get("env")
    assert after.get("volumeMounts") == before.get("volumeMounts")
    assert after["image"] == before["image"]


def test_mutation_is_idempotent(kserve_pod: dict[str, Any]) -> None:
    once = mutated(kserve_pod)
    again = mutate(once)
    assert again.allowed and again.patch == () and again.warnings == ()


def test_warnings_say_what_changed() -> None:
    pod = kserve_pods()[2][1]
    result = mutate(pod)
    text = "\n".join(result.warnings)
    assert "nvidia.com/gpu replaced by gpushare.io/gpu-memory: 20 (20 GiB)" in text
    assert "'--gpu-memory-utilization=0.9' replaced by" in text
    assert f"schedulerName default-scheduler -> {names.SCHEDULER_NAME}" in text


def test_the_storage_initializer_is_left_alone() -> None:
    after = mutated(kserve_pods()[0][1])
    assert after["spec"]["initContainers"] == kserve_pods()[0][1]["spec"]["initContainers"]


def test_a_job_container_gets_the_resource_only() -> None:
    pod = builders.job_pod()
    after = mutated(pod)
    trainer = after["spec"]["containers"][0]
    assert trainer["resources"]["limits"] == {names.RESOURCE_GPU_MEMORY: "12"}
    assert trainer["command"] == pod["spec"]["containers"][0]["command"]
    assert "args" not in trainer
    assert after["spec"]["schedulerName"] == names.SCHEDULER_NAME


def test_a_deployment_pod_keeps_its_sidecar_untouched() -> None:
    pod = builders.pod_of(builders.deployment())
    after = mutated(pod)
    server, sidecar = after["spec"]["containers"]
    assert server["args"] == ["Qwen/Qwen2.5-0.5B-Instruct", "--port", "8000", OURS]
    assert server["resources"]["limits"] == {names.RESOURCE_GPU_MEMORY: "16"}
    assert sidecar == pod["spec"]["containers"][1]


def test_a_vllm_container_without_a_gpu_is_left_unchanged_and_told_why() -> None:
    pod = builders.pod_of(builders.deployment())
    del pod["spec"]["containers"][0]["resources"]
    result = mutate(pod)
    assert result.allowed and result.patch == ()
    assert "container server, which runs vLLM, requests no nvidia.com/gpu" in result.warnings[0]


def test_a_pod_without_gpu_or_vllm_is_left_unchanged_with_a_warning() -> None:
    pod = builders.pod_of(builders.deployment())
    pod["spec"]["containers"] = [pod["spec"]["containers"][1]]  # the transformer-like sidecar only
    result = mutate(pod)
    assert result.allowed and result.patch == ()
    assert "left unchanged" in result.warnings[0]


def test_a_pod_without_the_annotation_passes_untouched() -> None:
    pod = builders.job_pod()
    del pod["metadata"]["annotations"]
    assert mutate(pod) == mutation.Mutation()


def test_a_user_scheduler_name_is_replaced() -> None:
    pod = builders.job_pod()
    pod["spec"]["schedulerName"] = "volcano"
    result = mutate(pod)
    assert builders.apply(pod, result.patch)["spec"]["schedulerName"] == names.SCHEDULER_NAME
    assert any("schedulerName volcano ->" in w for w in result.warnings)


def test_the_scheduler_name_is_configurable() -> None:
    settings = config.load(environ={}, overrides={"webhook.scheduler_name": "my-scheduler"})
    result = mutation.pod(builders.job_pod(), settings=settings, largest_cuda_total_bytes=None)
    assert builders.apply(builders.job_pod(), result.patch)["spec"]["schedulerName"] == (
        "my-scheduler"
    )


def test_unknown_cards_allow_with_a_warning() -> None:
    result = mutate(builders.job_pod(), largest=None)
    assert result.allowed and result.patch
    assert any("no GPU node has reported" in w for w in result.warnings)


def _with(pod: dict[str, Any], edit: Any) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    edit(pod)
    return pod


def _server(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _two_gpus(pod: dict[str, Any]) -> None:
    _server(pod)["resources"]["limits"][names.NVIDIA_GPU_RESOURCE] = "2"


def _tensor_parallel(pod: dict[str, Any]) -> None:
    _server(pod)["args"] += ["--tensor-parallel-size", "2"]


def _system_env(pod: dict[str, Any]) -> None:
    _server(pod).setdefault("env", []).append({"name": names.ENV_VLLM_UTILIZATION, "value": "0.5"})


def _cuda_visible(pod: dict[str, Any]) -> None:
    _server(pod).setdefault("env", []).append({"name": "CUDA_VISIBLE_DEVICES", "value": "0"})


def _unrewritable_shell(pod: dict[str, Any]) -> None:
    _server(pod)["command"] = ["sh", "-c", "vllm serve a & vllm serve b"]
    _server(pod)["args"] = []


def _second_gpu_container(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][1]["resources"] = {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}}


def _gpu_init(pod: dict[str, Any]) -> None:
    pod["spec"]["initContainers"] = [
        {"name": "warmup", "image": "x", "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}}}
    ]


def _node_name(pod: dict[str, Any]) -> None:
    pod["spec"]["nodeName"] = "gpu-1"


def _vllm_elsewhere(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][1]["command"] = ["vllm", "serve", "m"]
    pod["spec"]["containers"][1]["image"] = "vllm/vllm-openai:v0.24.0"
    _server(pod)["command"] = ["python", "other.py"]
    _server(pod)["image"] = "python:3.12"


def _annotation(value: str) -> Any:
    return lambda pod: pod["metadata"]["annotations"].update({names.ANNOTATION_GPU_MEMORY: value})


REFUSALS = [
    ("two GPUs", _two_gpus, "asks for 2 GPUs"),
    ("tensor parallel", _tensor_parallel, "--tensor-parallel-size 2"),
    ("utilization variable in env", _system_env, names.ENV_VLLM_UTILIZATION),
    ("CUDA_VISIBLE_DEVICES in env", _cuda_visible, "CUDA_VISIBLE_DEVICES"),
    ("shell string", _unrewritable_shell, "more than one vLLM server"),
    ("two GPU containers", _second_gpu_container, "all ask for a GPU"),
    ("GPU init container", _gpu_init, "init container warmup"),
    ("nodeName", _node_name, "bypasses the scheduler"),
    ("vLLM in another container", _vllm_elsewhere, "runs vLLM but container server holds the GPU"),
    ("unparseable", _annotation("twenty gigs"), "is not a Kubernetes quantity"),
    ("zero", _annotation("0"), "asks for no memory"),
    ("reserve", _annotation("512Mi"), "does not exceed the per-instance reserve"),
    ("too large", _annotation("100Gi"), "more than the largest grant possible"),
]


@pytest.mark.parametrize(
    ("edit", "says"), [(e, s) for _, e, s in REFUSALS], ids=[i for i, _, _ in REFUSALS]
)
def test_pods_gpushare_cannot_serve_are_refused_with_a_reason(edit: Any, says: str) -> None:
    result = mutate(_with(builders.pod_of(builders.deployment()), edit))
    assert not result.allowed
    assert says in result.message
    assert result.patch == ()


@pytest.mark.parametrize(
    "body",
    [
        {"metadata": []},
        {"metadata": {"annotations": {names.ANNOTATION_GPU_MEMORY: "1Gi"}}, "spec": []},
        {"metadata": {"annotations": {names.ANNOTATION_GPU_MEMORY: "2Gi"}}, "spec": {}},
        {
            "metadata": {"annotations": {names.ANNOTATION_GPU_MEMORY: "2Gi"}},
            "spec": {"containers": [{"name": "a", "args": "--x"}]},
        },
        {
            "metadata": {"annotations": {names.ANNOTATION_GPU_MEMORY: "2Gi"}},
            "spec": {"containers": [{"name": "a", "resources": {"limits": ["x"]}}]},
        },
    ],
    ids=["metadata", "spec", "no containers", "args", "limits"],
)
def test_malformed_pods_are_refused_not_crashed_on(body: dict[str, Any]) -> None:
    result = mutate(body)
    assert [r.code for r in result.reasons] == ["malformed"]
