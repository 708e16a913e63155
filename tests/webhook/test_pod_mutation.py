"""The Pod mutation on the pods KServe, a Deployment and a Job would create."""

import copy
from typing import Any

import pytest

from gpushare.core import config, names
from gpushare.webhook import mutation
from tests.webhook import builders
from tests.webhook.builders import mutate, mutated

OURS = names.VLLM_UTILIZATION_ARG


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


def _argv(container: dict[str, Any]) -> list[str]:
    return [*(container.get("command") or []), *(container.get("args") or [])]


def test_a_kserve_transformer_pod_is_left_as_it_is() -> None:
    isvc = builders.with_transformer(builders.isvc("isvc-vllm-openai.yaml"))
    transformer = builders.transformer_pod(isvc)
    assert transformer["metadata"]["annotations"][names.ANNOTATION_GPU_MEMORY] == "20Gi"
    assert transformer["spec"]["containers"][0]["name"] == "kserve-container"
    result = mutate(transformer)
    assert result.allowed and result.patch == ()
    assert "no container requests nvidia.com/gpu: the pod is left unchanged" in result.warnings[0]
    after = mutated(builders.predictor_pod(isvc))  # its predictor is still shared
    assert _argv(after["spec"]["containers"][0])[-1] == OURS


def test_a_gpu_server_that_is_not_vllm_gets_the_grant_and_no_vllm_flag() -> None:
    pod = builders.predictor_pod(builders.tgi_isvc())
    result = mutate(pod)
    after = mutated(pod)
    server = after["spec"]["containers"][0]
    assert server["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == "20"
    assert server["args"] == pod["spec"]["containers"][0]["args"]
    assert any("sees no vLLM server" in w and "at most 20 GiB" in w for w in result.warnings)


@pytest.mark.parametrize("command", list(builders.WRAPPED.values()), ids=list(builders.WRAPPED))
def test_vllm_behind_a_wrapper_gets_the_flag_where_its_arguments_are(command: list[str]) -> None:
    server = mutated(builders.predictor_pod(builders.wrapped_isvc(command)))["spec"]["containers"][
        0
    ]
    argv = _argv(server)
    assert sum(OURS in token for token in argv) == 1
    assert argv[-1].endswith(OURS)
    assert argv[: len(command) - 1] == command[:-1]  # the wrapper is kept


def test_a_flag_split_across_command_and_args_leaves_no_stray_value() -> None:
    server = mutated(builders.predictor_pod(builders.split_flag_isvc()))["spec"]["containers"][0]
    assert server["command"] == ["vllm", "serve", "/mnt/models"]
    assert server["args"] == ["--port", "8080", OURS]


def test_a_readiness_sidecar_that_mentions_vllm_serve_is_no_server() -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    sidecar = {
        "name": "wait-ready",
        "image": "curlimages/curl:8.11.0",
        "command": ["sh", "-c", "until curl -sf localhost:8080/health; do sleep 2; done; "
                    "echo 'vllm serve is up'; sleep infinity"],
    }  # fmt: skip
    pod["spec"]["containers"].append(sidecar)
    after = mutated(pod)
    assert after["spec"]["containers"][1] == sidecar


def test_two_vllm_containers_without_a_gpu_are_told_the_truth() -> None:
    pod = builders.pod_of(builders.deployment())
    del pod["spec"]["containers"][0]["resources"]
    pod["spec"]["containers"][1] = {
        "name": "second",
        "image": "vllm/vllm-openai:v0.24.0",
        "command": ["vllm", "serve", "other"],
    }
    result = mutate(pod)
    assert result.allowed and result.patch == ()
    assert (
        "containers server, second run vLLM and none requests nvidia.com/gpu"
        in (result.warnings[0])
    )


def test_a_hand_set_grant_that_disagrees_is_replaced_by_the_annotation_and_said_so() -> None:
    pod = builders.job_pod()
    pod["spec"]["containers"][0]["resources"]["limits"][names.RESOURCE_GPU_MEMORY] = "4"
    result = mutate(pod)
    after = mutated(pod)
    assert after["spec"]["containers"][0]["resources"]["limits"] == {
        names.RESOURCE_GPU_MEMORY: "12"
    }
    assert any(
        "resources.limits gpushare.io/gpu-memory: 4 is replaced by 12: the annotation" in w
        for w in result.warnings
    )


def test_no_nodes_reported_a_size_above_the_configured_ceiling_is_refused() -> None:
    for value in ("300Gi", "1e30"):
        result = mutate(builders.job_pod(memory=value), largest=None)
        assert not result.allowed
        assert "more than the largest grant possible" in result.message


def _kv_cache(pod: dict[str, Any]) -> None:
    _server(pod)["args"] += ["--kv-cache-memory-bytes", "8589934592"]


def _mig(pod: dict[str, Any]) -> None:
    _server(pod)["resources"]["limits"]["nvidia.com/mig-1g.10gb"] = "1"


def _time_shared(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][1]["resources"] = {"limits": {"nvidia.com/gpu.shared": "1"}}


def _preset(key: str, value: str) -> Any:
    return lambda pod: pod["metadata"]["annotations"].update({key: value})


def _sidecar_env(name: str) -> Any:
    return lambda pod: pod["spec"]["containers"][1].update(env=[{"name": name, "value": "/tmp"}])


def _env_from_secret(pod: dict[str, Any]) -> None:
    _server(pod)["env"] = [
        {
            "name": names.ENV_MPS_MEM_LIMIT,
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "limit"}},
        }
    ]


def _env_from_prefix(pod: dict[str, Any]) -> None:
    _server(pod)["envFrom"] = [{"prefix": "CUDA_", "configMapRef": {"name": "tuning"}}]


MORE_REFUSALS = [
    ("kv cache size", _kv_cache, "--kv-cache-memory-bytes"),
    ("MIG slice", _mig, "asks for nvidia.com/mig-1g.10gb beside gpushare.io/gpu-memory"),
    ("time-shared GPU", _time_shared, "asks for nvidia.com/gpu.shared"),
    (
        "allocations preset",
        _preset(names.ANNOTATION_ALLOCATIONS, "[]"),
        "gpushare.io/allocations is a system annotation",
    ),
    (
        "card preset",
        _preset(names.ANNOTATION_CARD_UUID, "GPU-1"),
        "gpushare.io/card-uuid is a system annotation",
    ),
    ("typo key", _preset("gpushare.io/polcy", "spread"), "did you mean gpushare.io/policy?"),
    ("MPS pipe in a sidecar", _sidecar_env(names.ENV_MPS_PIPE_DIRECTORY), "CUDA_MPS_PIPE"),
    ("any CUDA_MPS_ name", _sidecar_env("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"), "CUDA_MPS_ACTIVE"),
    ("a gpushare name", _sidecar_env("GPUSHARE_CARD_UUID"), "sets GPUSHARE_CARD_UUID"),
    ("from a Secret", _env_from_secret, f"sets {names.ENV_MPS_MEM_LIMIT}"),
    ("envFrom prefix", _env_from_prefix, "with prefix 'CUDA_', which can make"),
    ("Arabic-Indic digits", _annotation("٢٠Gi"), "is not a Kubernetes quantity"),
    ("fullwidth digits", _annotation("２０Gi"), "is not a Kubernetes quantity"),
]


@pytest.mark.parametrize(
    ("edit", "says"), [(e, s) for _, e, s in MORE_REFUSALS], ids=[i for i, _, _ in MORE_REFUSALS]
)
def test_pods_that_would_escape_or_confuse_the_grant_are_refused(edit: Any, says: str) -> None:
    result = mutate(_with(builders.pod_of(builders.deployment()), edit))
    assert not result.allowed
    assert says in result.message, result.message
    assert result.patch == ()


def test_env_from_without_a_prefix_is_warned_about() -> None:
    def edit(pod: dict[str, Any]) -> None:
        _server(pod)["envFrom"] = [{"secretRef": {"name": "hf-token"}}]

    result = mutate(_with(builders.pod_of(builders.deployment()), edit))
    assert result.allowed
    assert any("takes variables from secret hf-token" in w for w in result.warnings)


def test_a_typo_key_alone_is_refused_on_a_pod() -> None:
    pod = builders.job_pod()
    pod["metadata"]["annotations"] = {"gpushare.io/gpu_memory": "12Gi"}
    result = mutate(pod)
    assert not result.allowed and "did you mean gpushare.io/gpu-memory?" in result.message


def test_an_env_entry_whose_name_is_a_list_is_refused_as_malformed() -> None:
    pod = builders.job_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": ["A"], "value": "x"}]
    result = mutate(pod)
    assert [r.code for r in result.reasons] == ["malformed"]
    assert "env[0]" in result.message
