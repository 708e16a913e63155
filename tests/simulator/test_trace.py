"""The built-in trace: about sixty realistic services, each asking what the estimator says."""

from collections import Counter

from gpushare.core import names, quantities
from gpushare.core.quantities import GI, MI
from gpushare.simulator import estimate, models, trace, workload

RESERVE = 716 * MI


def _trace(seed: int = 0) -> list[workload.Service]:
    return trace.builtin(reserve_bytes=RESERVE, unit_bytes=GI, seed=seed)


def test_the_trace_holds_sixty_services_from_half_a_billion_to_seventy_billion_parameters() -> None:
    services = _trace()
    assert len(services) == sum(kind.count for kind in trace.KINDS) == 60
    params = {models.CATALOG[k.model].parameters().total for k in trace.KINDS}
    assert min(params) < 1e9 and max(params) > 70e9
    assert {k.quantization for k in trace.KINDS} >= {None, "fp8", "int8"}
    assert len({k.max_model_len for k in trace.KINDS}) >= 4
    assert len({k.max_num_seqs for k in trace.KINDS}) >= 4


def test_each_service_asks_for_the_estimate_of_its_own_model_and_flags() -> None:
    by_name = {s.name: s for s in _trace()}
    for kind in trace.KINDS:
        expected = estimate.estimate(
            models.CATALOG[kind.model], reserve_bytes=RESERVE, unit_bytes=GI,
            quantization=kind.quantization, max_model_len=kind.max_model_len,
            max_num_seqs=kind.max_num_seqs,
        )
        service = by_name[trace._name(kind, 1)]
        assert service.annotation == expected.quantity
        assert service.minimum_budget_bytes is not None
        # Inside the budget the grant leaves, with room for at least one full sequence.
        assert service.minimum_budget_bytes <= expected.request_bytes - RESERVE
        assert service.minimum_budget_bytes + RESERVE <= expected.minimum_bytes
        assert f"--max-model-len={kind.max_model_len}" in str(service.manifest)


def test_every_request_fits_an_80_gb_card_with_its_mps_server() -> None:
    for service in _trace():
        assert service.requested_bytes is not None
        assert service.requested_bytes + 66 * MI <= 81_080 * MI, service.name


def test_names_are_unique_dns_labels_and_both_kserve_forms_appear() -> None:
    services = _trace()
    workload.check_unique(services)
    for service in services:
        workload.parse(service.manifest, source="built-in")
    forms = Counter("containers" in s.manifest["spec"]["predictor"] for s in services)
    assert forms[True] == forms[False] == 30
    tuned = [s for s in services if "--gpu-memory-utilization" in str(s.manifest)]
    assert tuned, "some services carry a hand-tuned utilization for the webhook to replace"


def test_the_seed_shuffles_arrivals_but_not_the_services() -> None:
    first, second = _trace(0), _trace(1)
    assert [s.key for s in first] != [s.key for s in second]
    assert sorted(s.key for s in first) == sorted(s.key for s in second)
    assert all(names.ANNOTATION_GPU_MEMORY in s.manifest["metadata"]["annotations"] for s in first)
    assert quantities.parse_bytes(first[0].annotation or "") > 0
