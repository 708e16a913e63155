"""The DRA backend's arithmetic and objects: cards as consumable capacity, claims as grants."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gpushare.core import dra, errors, names, placement, quantities
from gpushare.core.nodereport import CardReport
from gpushare.core.quantities import GI, MI

UNIT = GI
DEVICE_CLASS = (
    Path(__file__).resolve().parents[2] / "manifests" / "components" / "dra" / "deviceclass.yaml"
)
"""The DeviceClass as installed."""
MPS_SERVER = 66 * MI
H100_CUDA_TOTAL = int(79.18 * GI)


def _card(index: int = 0, *, cuda_total: int = H100_CUDA_TOTAL, healthy: bool = True) -> CardReport:
    return CardReport(
        uuid=f"GPU-{index:08x}-0000-4000-8000-000000000000",
        index=index,
        model="NVIDIA H100 80GB HBM3",
        total_bytes=cuda_total + 480 * MI,
        reserved_bytes=480 * MI,
        used_bytes=0,
        free_bytes=cuda_total,
        healthy=healthy,
    )


def _round_up(request: int, policy: dict[str, object]) -> int:
    """kube-scheduler's rounding of a request under a validRange policy (min + n * step)."""
    valid = policy["validRange"]
    assert isinstance(valid, dict)
    low, step = quantities.parse_bytes(valid["min"]), quantities.parse_bytes(valid["step"])
    if request <= low:
        return low
    return low + -(-(request - low) // step) * step


@pytest.mark.parametrize(
    ("granted", "overhead", "consumed"),
    [
        (20 * GI, MPS_SERVER, 20 * GI + MPS_SERVER),
        (20 * GI - 1, MPS_SERVER, 20 * GI + MPS_SERVER),
        (20 * GI + 1, MPS_SERVER, 21 * GI + MPS_SERVER),
        (12 * GI, 0, 12 * GI),
    ],
    ids=["whole-units-mps", "rounds-up-to-a-unit", "a-byte-over-takes-a-unit", "no-overhead"],
)
def test_a_claim_consumes_its_whole_units_plus_the_extenders_overhead(
    granted: int, overhead: int, consumed: int
) -> None:
    assert dra.request_bytes(granted, unit_bytes=UNIT, overhead_bytes=overhead) == consumed
    units = quantities.to_units(granted, UNIT)
    assert consumed == placement.cost(units * UNIT, overhead)
    assert dra.granted_bytes(consumed, unit_bytes=UNIT, overhead_bytes=overhead) == units * UNIT


@given(
    request=st.integers(min_value=0, max_value=80 * GI),
    overhead=st.sampled_from([0, MPS_SERVER]),
)
def test_whatever_a_tenant_asks_the_policy_yields_a_grant_within_what_it_consumes(
    request: int, overhead: int
) -> None:
    capacity = dra.capacity_bytes(H100_CUDA_TOTAL, UNIT)
    policy = dra.request_policy(capacity=capacity, unit_bytes=UNIT, overhead_bytes=overhead)
    consumed = _round_up(request, policy)
    largest = quantities.parse_bytes(policy["validRange"]["max"])
    if consumed > largest:
        return  # the policy refuses it: no card is allocated
    granted = dra.granted_bytes(consumed, unit_bytes=UNIT, overhead_bytes=overhead)
    assert granted % UNIT == 0
    assert UNIT <= granted <= consumed - overhead
    assert consumed <= capacity


def test_a_consumed_amount_without_room_for_a_unit_is_refused_with_what_to_ask() -> None:
    with pytest.raises(errors.BadRequest, match="ask for at least 1Gi"):
        dra.granted_bytes(512 * MI, unit_bytes=UNIT, overhead_bytes=MPS_SERVER)


def test_a_card_offers_its_cuda_visible_memory_in_whole_units() -> None:
    device = dra.device(_card(3), unit_bytes=UNIT, overhead_bytes=MPS_SERVER)
    assert device["name"] == "gpu-3"
    assert device["allowMultipleAllocations"] is True
    memory = device["capacity"][names.DRA_CAPACITY_MEMORY]
    assert memory["value"] == "79Gi"
    # From one unit plus the MPS server (1 GiB + 66 MiB) to 78 GiB plus it, in steps of 1 GiB.
    assert memory["requestPolicy"] == {
        "default": "1090Mi",
        "validRange": {"min": "1090Mi", "max": "79938Mi", "step": "1Gi"},
    }
    assert device["attributes"][names.DRA_ATTRIBUTE_UUID] == {"string": _card(3).uuid}
    assert device["attributes"][names.DRA_ATTRIBUTE_INDEX] == {"int": 3}


def test_the_slice_offers_healthy_cards_only_in_index_order() -> None:
    cards = [_card(1), _card(0, healthy=False), _card(2), _card(4, cuda_total=UNIT)]
    body = dra.resource_slice(
        "node-a", cards, generation=7, unit_bytes=UNIT, overhead_bytes=MPS_SERVER
    )
    assert body["metadata"]["name"] == "node-a-gpu.gpushare.io"
    spec = body["spec"]
    assert spec["driver"] == names.DRA_DRIVER
    assert spec["nodeName"] == "node-a"
    assert spec["pool"] == {"name": "node-a", "generation": 7, "resourceSliceCount": 1}
    assert [device["name"] for device in spec["devices"]] == ["gpu-1", "gpu-2"]


def test_a_template_is_named_by_its_grant_and_asks_for_one_card_of_the_class() -> None:
    body = dra.claim_template("team-a", 20 * GI, unit_bytes=UNIT, overhead_bytes=MPS_SERVER)
    assert body["metadata"] == {
        "name": "gpushare-gpu-memory-20gi",
        "namespace": "team-a",
        "labels": {names.LABEL_PART_OF: "gpushare"},
    }
    (request,) = body["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == names.DRA_DEVICE_CLASS
    assert request["exactly"]["count"] == 1
    assert request["exactly"]["capacity"]["requests"] == {"memory": "20546Mi"}


def test_allocation_results_of_other_drivers_are_ignored_and_ours_read() -> None:
    claim = {
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {
                            "driver": "gpu.nvidia.com",
                            "pool": "n",
                            "device": "gpu-0",
                            "request": "x",
                        },
                        {
                            "driver": names.DRA_DRIVER,
                            "pool": "node-a",
                            "device": "gpu-1",
                            "request": "gpu",
                            "shareID": "0b7e1e4e-6a2d-4d7e-9d55-0d3f4d9a0c11",
                            "consumedCapacity": {"memory": "20546Mi"},
                        },
                    ]
                }
            }
        }
    }
    (ours,) = dra.allocated(claim)
    assert ours == dra.Allocated(
        request="gpu",
        pool="node-a",
        device="gpu-1",
        share_id="0b7e1e4e-6a2d-4d7e-9d55-0d3f4d9a0c11",
        consumed_bytes=20546 * MI,
    )


def test_an_allocation_without_consumed_memory_is_refused_with_the_likely_cause() -> None:
    claim = {
        "status": {
            "allocation": {
                "devices": {"results": [{"driver": names.DRA_DRIVER, "device": "gpu-0"}]}
            }
        }
    }
    with pytest.raises(errors.BadRequest, match="consumable capacity is off"):
        dra.allocated(claim)


def test_the_device_class_is_the_manifests_less_its_labels() -> None:
    manifest = yaml.safe_load(DEVICE_CLASS.read_text())
    manifest["metadata"].pop("labels")
    assert dra.device_class() == manifest


@pytest.mark.parametrize(
    "body",
    [
        yaml.safe_load(DEVICE_CLASS.read_text()),
        dra.device_class(),
        dra.resource_slice(
            "node-a", [_card(0)], generation=1, unit_bytes=UNIT, overhead_bytes=MPS_SERVER
        ),
        dra.claim_template("ns", 20 * GI, unit_bytes=UNIT, overhead_bytes=MPS_SERVER),
    ],
    ids=["device-class", "device-class-in-code", "resource-slice", "claim-template"],
)
def test_objects_match_the_published_schema(body: dict[str, object]) -> None:
    kubernetes_validate.validate(body, "1.36", strict=True)
