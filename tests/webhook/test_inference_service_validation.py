"""Validation of InferenceServices: what is refused, and the message that says what to write."""

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from gpushare.core import config, names, nodereport
from gpushare.core.ids import CardUUID, NodeName
from gpushare.core.quantities import GI, MI
from gpushare.webhook import inventory, validation
from tests.webhook import builders

SETTINGS = config.Settings()
H100 = (81_559 - 479) * 1024**2
"""An H100 80GB's CUDA total (NVML's 81,559 MiB less the 479 MiB the driver reserves)."""
KEY = names.ANNOTATION_GPU_MEMORY


def check(
    body: dict[str, Any], *, largest: int | None = H100, old: Any = None
) -> validation.Verdict:
    builders.check_isvc(body)  # every object here is one the CRD's schema admits
    return validation.inference_service(
        body, settings=SETTINGS, largest_cuda_total_bytes=largest, old=old
    )


@pytest.mark.parametrize("fixture", builders.FIXTURES)
@pytest.mark.parametrize("memory", ["20Gi", "20480Mi", "1.5Gi", "21474836480", "79Gi"])
def test_the_seed_fixtures_with_the_annotation_are_accepted(fixture: str, memory: str) -> None:
    verdict = check(builders.isvc(fixture, memory=memory))
    assert verdict.allowed, verdict.message
    assert verdict.warnings == ()


def test_model_form_inference_services_are_accepted() -> None:
    body = builders.model_isvc("bloom", model_format="vLLM", args=["--max-model-len=2048"])
    assert check(body).allowed


def test_inference_services_without_gpushare_keys_are_not_our_business() -> None:
    body = builders.isvc(builders.FIXTURES[0], memory=None)
    body["spec"]["predictor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "4"
    assert check(body) == validation.Verdict()


def test_other_owners_keys_that_mention_gpushare_are_left_alone() -> None:
    body = builders.isvc(builders.FIXTURES[1], **{"example.com/gpushare-enabled": "yes"})
    assert check(body).allowed


def test_unknown_cards_allow_with_a_warning() -> None:
    verdict = check(builders.isvc(builders.FIXTURES[1]), largest=None)
    assert verdict.allowed
    assert "no GPU node has reported its cards yet" in verdict.warnings[0]


def test_a_predictor_without_a_gpu_is_warned_about() -> None:
    body = builders.isvc(builders.FIXTURES[1])
    for kind in ("limits", "requests"):
        del body["spec"]["predictor"]["containers"][0]["resources"][kind]["nvidia.com/gpu"]
    verdict = check(body)
    assert verdict.allowed
    assert any("KServe may run a CPU image" in w for w in verdict.warnings)


SHARE = names.ANNOTATION_COMPUTE_SHARE
ANNOTATION_REFUSALS = [
    ("words", {KEY: "twenty gigs"}, 'is not a Kubernetes quantity; write a size such as "20Gi"'),
    ("sub-byte suffix", {KEY: "500m"}, "sub-unit suffix 'm'"),
    ("negative", {KEY: "-1Gi"}, "negative"),
    ("zero", {KEY: "0"}, 'asks for no memory; write what the server needs, e.g. "20Gi"'),
    ("zero with unit", {KEY: "0Gi"}, "asks for no memory"),
    ("reserve", {KEY: "700Mi"}, "does not exceed the per-instance reserve of 716 MiB"),
    ("reserve suggests", {KEY: "1Mi"}, "at least '1Gi'"),
    ("larger than any card", {KEY: "100Gi"}, "more than the largest grant possible"),
    ("largest suggests", {KEY: "80Gi"}, "ask for at most '79Gi'"),
    ("near miss key", {"gpushare.io/gpu_memory": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
    ("short key", {"gpushare.io/gpu-mem": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
    ("wrong domain", {"gpushare/gpu-memory": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
    ("dot for slash", {"gpushare.io.gpu-memory": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
    ("capitals", {"gpushare.io/GPU-Memory": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
    ("policy typo", {"gpushare.io/polcy": "spread"}, "did you mean gpushare.io/policy?"),
    ("far off", {"gpushare.io/zzz": "1"}, "gpushare reads only gpushare.io/gpu-memory,"),
    ("extra key beside", {KEY: "20Gi", "gpushare.io/gpu-memroy": "2Gi"}, "did you mean"),
    ("system key", {KEY: "20Gi", names.ANNOTATION_CARD_UUID: "GPU-1"}, "written by gpushare"),
    ("bad policy", {KEY: "20Gi", names.ANNOTATION_POLICY: "packed"}, "fill, binpack, spread"),
    ("share words", {KEY: "20Gi", SHARE: "half"}, "write a whole percentage from 1 to 100"),
    ("share zero", {KEY: "20Gi", SHARE: "0"}, 'such as "30"'),
    ("share above all", {KEY: "20Gi", SHARE: "150%"}, "from 1 to 100"),
    ("share fraction", {KEY: "20Gi", SHARE: "0.3"}, "whole percentage"),
    ("share typo", {KEY: "20Gi", "gpushare.io/compute-shares": "30"}, "did you mean"),
]


@pytest.mark.parametrize(
    ("values", "says"),
    [(v, s) for _, v, s in ANNOTATION_REFUSALS],
    ids=[i for i, _, _ in ANNOTATION_REFUSALS],
)
def test_bad_annotations_are_refused_saying_what_to_write(
    values: dict[str, str], says: str
) -> None:
    body = builders.isvc(builders.FIXTURES[1], memory=None, **values)
    verdict = check(body)
    assert not verdict.allowed
    assert says in verdict.message


@pytest.mark.parametrize("share", ["1", "30", "30%", " 100 "])
def test_a_compute_share_from_one_to_a_hundred_percent_is_valid(share: str) -> None:
    body = builders.isvc(builders.FIXTURES[1], **{SHARE: share})
    assert check(body).allowed


@pytest.mark.parametrize("policy", ["fill", "binpack", "spread"])
def test_every_placement_policy_is_a_valid_annotation(policy: str) -> None:
    body = builders.isvc(builders.FIXTURES[1], **{names.ANNOTATION_POLICY: policy})
    assert check(body).allowed


def _custom(edit: Any) -> dict[str, Any]:
    body = builders.isvc(builders.FIXTURES[0])
    edit(body["spec"]["predictor"]["containers"][0])
    return body


def _gpus(count: str) -> Any:
    def edit(container: dict[str, Any]) -> None:
        for kind in ("limits", "requests"):
            container["resources"][kind]["nvidia.com/gpu"] = count

    return edit


def _reported(total: int, reserved: int) -> inventory.Cards:
    """The webhook's inventory after one node reported one idle card."""
    card = nodereport.CardReport(
        uuid=CardUUID("GPU-00000000-0000-4000-8000-000000000000"),
        index=0,
        model="NVIDIA H100 80GB HBM3",
        total_bytes=total,
        reserved_bytes=reserved,
        used_bytes=0,
        free_bytes=total,
    )
    cards = inventory.Cards()
    report = nodereport.NodeReport(heartbeat=datetime.now(UTC), cards=(card,))
    cards.update(NodeName("gpu-0"), report.encode())
    return cards


H100_NVML = (81_559 * MI, 479 * MI)
"""An H100 80GB as NVML reports it: total and the driver's reserved part (CUDA sees 79.18 GiB)."""
ROUND_80 = (80 * GI + 480 * MI, 480 * MI)
"""A card whose CUDA total is exactly 80 GiB."""

CEILINGS = [
    # id, card (total, reserved), isolation, unit, request, the largest grant possible (None: fits)
    ("H100 in 512Mi units", H100_NVML, "mps", "512Mi", "79.5Gi", "79Gi"),
    ("H100 in 256Mi units", H100_NVML, "none", "256Mi", "79.5Gi", "79Gi"),
    ("H100 in 1Gi units", H100_NVML, "mps", "1Gi", "79.5Gi", "79Gi"),
    ("H100 at its largest grant", H100_NVML, "mps", "512Mi", "79Gi", None),
    ("the MPS server takes the last unit", ROUND_80, "mps", "1Gi", "80Gi", "79Gi"),
    ("without MPS the whole card", ROUND_80, "none", "1Gi", "80Gi", None),
    # The plugin counts the card's shared server: 80 units were never on offer (the old ceiling
    # accepted them, and the pod waited forever).
    ("the shared server takes the last unit too", ROUND_80, "mps-shared", "1Gi", "80Gi", "79Gi"),
]


@pytest.mark.parametrize(
    ("card", "isolation", "unit", "memory", "most"),
    [row[1:] for row in CEILINGS],
    ids=[row[0] for row in CEILINGS],
)
def test_a_request_is_bounded_by_the_largest_grant_a_reported_card_can_hold(
    card: tuple[int, int], isolation: str, unit: str, memory: str, most: str | None
) -> None:
    settings = config.validate({"isolation": isolation, "unit_bytes": unit})
    verdict = validation.inference_service(
        builders.isvc(builders.FIXTURES[1], memory=memory),
        settings=settings,
        largest_cuda_total_bytes=_reported(*card).largest(),
    )
    if most is None:
        assert verdict.allowed, verdict.message
        return
    (reason,) = verdict.reasons
    assert reason.code == "above-largest-card"
    assert f"more than the largest grant possible, {most.removesuffix('Gi')} GiB" in reason.message
    assert f"ask for at most {most!r}" in reason.message
    assert ("for an MPS server" in reason.message) == (isolation in ("mps", "mps-shared"))


SPEC_REFUSALS = [
    ("two GPUs", _custom(_gpus("2")), "asks for 2 GPUs (nvidia.com/gpu: 2)"),
    (
        "tensor parallel",
        _custom(lambda c: c["args"].extend(["--tensor-parallel-size", "2"])),
        "--tensor-parallel-size 2, which needs 2 GPUs",
    ),
    (
        "system env",
        _custom(
            lambda c: c["env"].append({"name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "value": "0=4G"})
        ),
        "sets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, which gpushare sets",
    ),
    (
        "shell string",
        _custom(lambda c: c.update(command=["sh", "-c", "vllm serve a; vllm serve b"], args=[])),
        "starts more than one vLLM server",
    ),
    (
        "model form, tensor parallel",
        builders.model_isvc("m", model_format="vLLM", args=["-tp", "4"]),
        "--tensor-parallel-size 4, which needs 4 GPUs",
    ),
    (
        "model form, 2 GPUs",
        builders.model_isvc("m", model_format="vLLM", args=[], gpus="2"),
        "spec.predictor.model asks for 2 GPUs",
    ),
]


@pytest.mark.parametrize(
    ("body", "says"), [(b, s) for _, b, s in SPEC_REFUSALS], ids=[i for i, _, _ in SPEC_REFUSALS]
)
def test_specs_sharing_cannot_serve_are_refused(body: dict[str, Any], says: str) -> None:
    verdict = check(body)
    assert not verdict.allowed
    assert says in verdict.message


def test_multi_node_serving_is_refused() -> None:
    body = builders.model_isvc("m", model_format="vLLM", args=[])
    body["spec"]["predictor"]["workerSpec"] = {"tensorParallelSize": 1, "pipelineParallelSize": 2}
    assert "workerSpec spreads one server over several nodes" in check(body).message


def test_every_reason_is_given_at_once() -> None:
    body = builders.isvc(builders.FIXTURES[0], memory="0", **{"gpushare.io/gpu_memory": "1"})
    verdict = check(body)
    assert {r.code for r in verdict.reasons} == {"unknown-annotation", "not-positive"}


def test_an_update_is_refused_only_for_problems_it_introduces() -> None:
    old = builders.isvc(builders.FIXTURES[1], memory="100Gi")  # admitted before a card shrank
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "a"}
    assert check(new, old=old).allowed
    new["metadata"]["annotations"][KEY] = "0"
    assert "asks for no memory" in check(new, old=old).message


def test_an_object_being_deleted_can_always_be_updated() -> None:
    new = builders.isvc(builders.FIXTURES[1], memory="zero")
    new["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    old = builders.isvc(builders.FIXTURES[1], memory="20Gi")
    assert check(new, old=old).allowed


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("gpushare.io/gpu_memory", KEY),
        ("gpushare.io/memory", KEY),
        ("gpushare.io/gpumemory", KEY),
        ("gpushare.io/policies", names.ANNOTATION_POLICY),
        ("gpushare.io/gpu", KEY),
        ("gpushare.io/foo", None),
    ],
)
def test_suggestions(key: str, expected: str | None) -> None:
    assert validation.suggest(key) == expected


def test_system_annotations_are_named_as_such() -> None:
    body = builders.isvc(builders.FIXTURES[1], **{names.ANNOTATION_ALLOCATIONS: "[]"})
    verdict = check(body)
    assert not verdict.allowed
    assert "gpushare.io/allocations is a system annotation, written by gpushare" in verdict.message


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({KEY: "0"}, "spec.predictor.annotations: gpushare.io/gpu-memory: '0' asks for no memory"),
        ({"gpushare.io/gpu_memory": "20Gi"}, "did you mean gpushare.io/gpu-memory?"),
        ({KEY: "２０Gi"}, "is not a Kubernetes quantity"),
    ],
    ids=["zero", "typo", "fullwidth"],
)
def test_predictor_annotations_are_checked_like_the_services(
    values: dict[str, str], says: str
) -> None:
    body = builders.isvc(builders.FIXTURES[1], memory=None)
    body["spec"]["predictor"]["annotations"] = values
    verdict = check(body)
    assert not verdict.allowed and says in verdict.message


def test_a_size_in_the_predictor_annotations_alone_checks_the_containers() -> None:
    body = builders.isvc(builders.FIXTURES[1], memory=None)
    body["spec"]["predictor"]["annotations"] = {KEY: "20Gi"}
    body["spec"]["predictor"]["containers"][0]["args"] += ["--tensor-parallel-size", "2"]
    assert "needs 2 GPUs" in check(body).message


def test_a_transformer_beside_an_annotated_service_is_warned_about() -> None:
    verdict = check(builders.with_transformer(builders.isvc(builders.FIXTURES[1])))
    assert verdict.allowed
    assert any(
        "copies gpushare.io/gpu-memory to the transformer's pods" in w for w in verdict.warnings
    )


def test_a_size_in_the_predictor_annotations_draws_no_transformer_warning() -> None:
    body = builders.with_transformer(builders.isvc(builders.FIXTURES[1], memory=None))
    body["spec"]["predictor"]["annotations"] = {KEY: "20Gi"}
    assert check(body).warnings == ()


def test_no_nodes_reported_the_configured_ceiling_bounds_a_request() -> None:
    verdict = check(builders.isvc(builders.FIXTURES[1], memory="289Gi"), largest=None)
    assert "more than the largest grant possible" in verdict.message
    assert check(builders.isvc(builders.FIXTURES[1], memory="200Gi"), largest=None).allowed


SERVER_REFUSALS = [
    ("kv cache", lambda c: c["args"].append("--kv-cache-memory-bytes=8G"), "ignores"),
    (
        "MIG",
        lambda c: c["resources"]["limits"].update({"nvidia.com/mig-3g.40gb": "1"}),
        "nvidia.com/mig-3g.40gb",
    ),
    (
        "envFrom prefix",
        lambda c: c.update(envFrom=[{"prefix": "GPUSHARE_", "secretRef": {"name": "x"}}]),
        "prefix 'GPUSHARE_'",
    ),
    (
        "MPS variable",
        lambda c: c["env"].append({"name": "CUDA_MPS_PIPE_DIRECTORY", "value": "/tmp/mine"}),
        "sets CUDA_MPS_PIPE_DIRECTORY",
    ),
]


@pytest.mark.parametrize(
    ("edit", "says"),
    [(e, s) for _, e, s in SERVER_REFUSALS],
    ids=[i for i, _, _ in SERVER_REFUSALS],
)
def test_servers_that_would_outgrow_or_escape_the_grant_are_refused(edit: Any, says: str) -> None:
    verdict = check(_custom(edit))
    assert not verdict.allowed and says in verdict.message
