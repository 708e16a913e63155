"""With ``backend: dra`` the annotation becomes a ResourceClaim instead of the extended resource."""

from typing import Any

import pytest

from gpushare.core import config, dra, names, sizing
from gpushare.webhook import mutation
from tests.webhook import builders
from tests.webhook.test_pod_mutation import kserve_pods

DRA = config.Settings(backend="dra")


def mutate(pod: dict[str, Any], *, largest: int | None = builders.H100) -> mutation.Mutation:
    return builders.mutate(pod, DRA, largest=largest)


def mutated(pod: dict[str, Any]) -> dict[str, Any]:
    return builders.mutated(pod, DRA)


@pytest.fixture(params=range(4), ids=["api_server", "vllm-openai", "vllmserver", "hf-vllm"])
def kserve_pod(request: pytest.FixtureRequest) -> dict[str, Any]:
    pod: dict[str, Any] = kserve_pods()[request.param][1]
    return pod


def _gpu_container(pod: dict[str, Any]) -> dict[str, Any]:
    holders: list[dict[str, Any]] = [
        c for c in pod["spec"]["containers"] if c.get("resources", {}).get("claims")
    ]
    assert len(holders) == 1
    return holders[0]


def test_the_gpu_container_names_a_claim_from_the_template_of_its_grant(
    kserve_pod: dict[str, Any],
) -> None:
    after = mutated(kserve_pod)
    container = _gpu_container(after)
    resources = container["resources"]
    for kind in ("limits", "requests"):
        assert names.NVIDIA_GPU_RESOURCE not in resources.get(kind, {})
        assert names.RESOURCE_GPU_MEMORY not in resources.get(kind, {})
    assert resources["claims"] == [{"name": names.DRA_CLAIM_NAME}]
    assert after["spec"]["resourceClaims"] == [
        {"name": names.DRA_CLAIM_NAME, "resourceClaimTemplateName": "gpushare-gpu-memory-20gi"}
    ]
    # kubelet never sees a DRA driver's environment (CDI is read by the runtime), so the value is
    # written out, for the largest card: (20 GiB - 716 MiB) / H100's CUDA total.
    line = container.get("command", []) + container.get("args", [])
    assert not any("$(" in item for item in line)
    expected = sizing.utilization(
        granted_bytes=20 * 1024**3, reserve_bytes=DRA.reserve_bytes, cuda_total_bytes=builders.H100
    )
    assert f"--gpu-memory-utilization={sizing.format_utilization(expected)}" in " ".join(line)
    assert "schedulerName" not in after["spec"]
    assert after["metadata"]["annotations"][names.ANNOTATION_MUTATED] == "20"


def test_the_warnings_speak_of_the_claim_not_of_the_extender(kserve_pod: dict[str, Any]) -> None:
    result = mutate(kserve_pod)
    assert any("ResourceClaimTemplate gpushare-gpu-memory-20gi" in w for w in result.warnings)
    assert not any(names.RESOURCE_GPU_MEMORY in w for w in result.warnings)
    assert not any("schedulerName" in w for w in result.warnings)


def test_the_mutation_is_idempotent(kserve_pod: dict[str, Any]) -> None:
    once = mutated(kserve_pod)
    assert mutate(once).patch == ()


def test_a_job_pod_gets_the_claim_and_keeps_its_other_claims() -> None:
    pod = builders.job_pod("12Gi")
    pod["spec"]["resourceClaims"] = [{"name": "scratch", "resourceClaimName": "scratch"}]
    pod["spec"]["containers"][0]["resources"]["claims"] = [{"name": "scratch"}]
    after = mutated(pod)
    assert after["spec"]["resourceClaims"][-1] == {
        "name": names.DRA_CLAIM_NAME,
        "resourceClaimTemplateName": "gpushare-gpu-memory-12gi",
    }
    assert after["spec"]["resourceClaims"][0]["name"] == "scratch"
    assert _gpu_container(after)["resources"]["claims"] == [
        {"name": "scratch"},
        {"name": names.DRA_CLAIM_NAME},
    ]


def test_the_template_named_is_the_one_the_core_builds() -> None:
    after = mutated(builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="17.5Gi")))
    name = after["spec"]["resourceClaims"][0]["resourceClaimTemplateName"]
    template = dra.claim_template(
        "ns", 18 * 1024**3, unit_bytes=DRA.unit_bytes, overhead_bytes=DRA.allocation_overhead_bytes
    )
    assert name == template["metadata"]["name"]


def test_the_extender_backend_is_unchanged(kserve_pod: dict[str, Any]) -> None:
    after = builders.apply(kserve_pod, builders.mutate(kserve_pod).patch)
    assert "resourceClaims" not in after["spec"]
    assert after["spec"]["schedulerName"] == names.SCHEDULER_NAME


def test_bad_annotations_are_refused_as_with_the_extender() -> None:
    result = mutate(builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml", memory="lots")))
    assert not result.allowed
    assert "20Gi" in result.message


def test_a_vllm_pod_is_refused_while_no_node_reports_a_card(kserve_pod: dict[str, Any]) -> None:
    result = mutate(kserve_pod, largest=None)
    assert not result.allowed
    assert "no GPU node has reported its cards yet" in result.message


def test_a_pod_that_does_not_run_vllm_needs_no_card_report() -> None:
    result = mutate(builders.job_pod("12Gi"), largest=None)
    assert result.allowed, result.message


def test_a_user_written_reference_to_the_variable_is_written_out_too() -> None:
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    pod["spec"]["containers"][0]["args"].append(names.VLLM_UTILIZATION_ARG)
    after = mutated(pod)
    assert not any("$(" in item for item in after["spec"]["containers"][0]["args"])


def test_a_transformer_pod_that_asks_for_no_gpu_gets_no_claim() -> None:
    isvc = builders.with_transformer(builders.isvc("isvc-vllm-openai.yaml"))
    result = mutate(builders.transformer_pod(isvc))
    assert result.allowed and result.patch == ()
    assert "no container requests nvidia.com/gpu: the pod is left unchanged" in result.warnings[0]
    assert _gpu_container(mutated(builders.predictor_pod(isvc)))  # its predictor gets the claim


@pytest.mark.parametrize("command", list(builders.WRAPPED.values()), ids=list(builders.WRAPPED))
def test_vllm_behind_a_wrapper_gets_the_value_written_out(command: list[str]) -> None:
    server = _gpu_container(mutated(builders.predictor_pod(builders.wrapped_isvc(command))))
    argv = [*(server.get("command") or []), *(server.get("args") or [])]
    assert not any("$(" in token for token in argv)
    assert sum(f"{names.VLLM_UTILIZATION_FLAG}=0." in token for token in argv) == 1
    assert argv[: len(command) - 1] == command[:-1]  # the wrapper is kept


def test_a_gpu_server_that_is_not_vllm_gets_the_claim_and_no_vllm_flag() -> None:
    pod = builders.predictor_pod(builders.tgi_isvc())
    result = mutate(pod, largest=None)
    server = _gpu_container(mutated(pod))
    assert server["args"] == pod["spec"]["containers"][0]["args"]
    assert result.allowed and any("sees no vLLM server" in w for w in result.warnings)


def test_a_rewritten_pod_with_a_hand_set_system_annotation_is_refused(
    kserve_pod: dict[str, Any],
) -> None:
    once = mutated(kserve_pod)
    once["metadata"]["annotations"][names.ANNOTATION_CARD_UUID] = "GPU-0"
    assert not mutate(once).allowed
