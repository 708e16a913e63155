"""Device IDs and the pure allocation logic: IDs in, card and environment out."""

from decimal import Decimal
from pathlib import Path

import pytest

from gpushare.core import config, errors, names, sizing
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import allocation, devices
from tests.deviceplugin.conftest import CARD_A, CARD_B, GI, H100_CUDA_TOTAL, MI

A = CardUUID(CARD_A)
B = CardUUID(CARD_B)


def ids(card: str, *units: int) -> list[str]:
    return [f"{card}-{u}" for u in units]


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (f"{CARD_A}-0", (CARD_A, 0)),
        (f"{CARD_A}-78", (CARD_A, 78)),
        (
            "MIG-5d3c0a0e-1111-2222-3333-444455556666-12",
            ("MIG-5d3c0a0e-1111-2222-3333-444455556666", 12),
        ),
    ],
    ids=["first-unit", "last-unit", "mig-uuid"],
)
def test_an_id_splits_into_card_and_unit(device: str, expected: tuple[str, int]) -> None:
    assert devices.parse(device) == expected


@pytest.mark.parametrize("device", ["", "GPU", "-3", f"{CARD_A}-x", f"{CARD_A}-"], ids=repr)
def test_a_malformed_id_is_refused_by_name(device: str) -> None:
    with pytest.raises(errors.BadRequest, match="not of the form"):
        devices.parse(device)


def test_ids_of_a_real_uuid_stay_within_63_characters() -> None:
    longest = devices.device_id(A, 49_999)
    assert len(longest) <= devices.MAX_ID_LENGTH
    with pytest.raises(errors.ConfigError, match="too long"):
        devices.device_id(CardUUID("GPU-" + "x" * 60), 0)


def test_numeric_order_of_units() -> None:
    assert sorted(ids(CARD_A, 10, 2, 1), key=devices.sort_key) == ids(CARD_A, 1, 2, 10)


@pytest.mark.parametrize(
    ("card_bytes", "unit", "units"),
    [
        (H100_CUDA_TOTAL, GI, 79),
        (80 * GI, GI, 80),
        (GI - 1, GI, 0),
        (-5, GI, 0),
        (10**15, 64 * MI, 50_000),
    ],
    ids=["h100", "exact", "under-one-unit", "negative", "capped"],
)
def test_unit_count(card_bytes: int, unit: int, units: int) -> None:
    assert devices.unit_count(card_bytes, unit) == units


def test_a_grant_is_its_card_and_its_unit_count() -> None:
    grant = allocation.grant_of(ids(CARD_A, 3, 1, 2), unit_bytes=GI)
    assert grant.card == CARD_A
    assert grant.devices == tuple(ids(CARD_A, 1, 2, 3))
    assert grant.granted_bytes == 3 * GI
    assert grant.limit_mib == 3072
    assert grant.key.startswith(CARD_A) and len(grant.key) == len(CARD_A) + 13


@pytest.mark.parametrize(
    "device_ids",
    [ids(CARD_A, 0) + ids(CARD_B, 0), []],
    ids=["two-cards", "none"],
)
def test_a_grant_needs_ids_of_exactly_one_card(device_ids: list[str]) -> None:
    with pytest.raises(errors.BadRequest):
        allocation.grant_of(device_ids, unit_bytes=GI)


def _settings(**agent: object) -> config.Settings:
    return config.validate({"agent": agent})


def test_environment_without_isolation() -> None:
    grant = allocation.grant_of(ids(CARD_A, *range(20)), unit_bytes=GI)
    setup = allocation.setup(
        grant,
        cuda_total_bytes=H100_CUDA_TOTAL,
        settings=_settings(),
        isolation="none",
        pipe_directory=None,
    )
    expected = sizing.utilization(
        granted_bytes=20 * GI, reserve_bytes=716 * MI, cuda_total_bytes=H100_CUDA_TOTAL
    )
    assert dict(setup.envs) == {
        names.ENV_VISIBLE_DEVICES: CARD_A,
        names.ENV_CARD_UUID: CARD_A,
        names.ENV_GRANTED_BYTES: str(20 * GI),
        names.ENV_VLLM_UTILIZATION: sizing.format_utilization(expected),
    }
    assert expected == Decimal("0.2437")
    assert setup.mounts == () and setup.cdi_devices == ()


def test_environment_under_mps_names_the_pipe_and_the_limit(tmp_path: Path) -> None:
    grant = allocation.grant_of(ids(CARD_B, 0, 1), unit_bytes=GI)
    setup = allocation.setup(
        grant,
        cuda_total_bytes=H100_CUDA_TOTAL,
        settings=_settings(cdi=True),
        isolation="mps",
        pipe_directory=tmp_path,
    )
    assert setup.envs[names.ENV_MPS_PIPE_DIRECTORY] == str(tmp_path)
    assert setup.envs[names.ENV_MPS_MEM_LIMIT] == f"{CARD_B}=2048M"
    assert setup.mounts == (allocation.Mount(str(tmp_path), str(tmp_path)),)
    assert setup.cdi_devices == (f"nvidia.com/gpu={CARD_B}",)


def test_a_grant_under_the_reserve_gets_no_utilization() -> None:
    grant = allocation.grant_of(ids(CARD_A, 0), unit_bytes=512 * MI)
    setup = allocation.setup(
        grant,
        cuda_total_bytes=H100_CUDA_TOTAL,
        settings=_settings(),
        isolation="none",
        pipe_directory=None,
    )
    assert names.ENV_VLLM_UTILIZATION not in setup.envs


def test_the_mps_limit_never_exceeds_a_grant_of_odd_bytes() -> None:
    grant = allocation.grant_of(ids(CARD_A, 0), unit_bytes=10**9)  # 1G = 953.67 MiB
    assert grant.limit_mib == 953


@pytest.mark.parametrize(
    ("others", "servers", "fits"),
    [(59 * GI, 0, True), (60 * GI, 0, False), (58 * GI, 2, True), (59 * GI, 1, False)],
    ids=["exactly-full", "over", "servers-fit", "server-tips-over"],
)
def test_grants_plus_servers_never_exceed_the_card(others: int, servers: int, fits: bool) -> None:
    grant = allocation.grant_of(ids(CARD_A, *range(20)), unit_bytes=GI)
    kwargs = {
        "cuda_total_bytes": 79 * GI,
        "other_grants_bytes": others,
        "servers": servers,
        "server_bytes": 66 * MI,
    }
    if fits:
        allocation.check_fits(grant, **kwargs)
    else:
        with pytest.raises(errors.NoFit, match="cannot take 20 GiB"):
            allocation.check_fits(grant, **kwargs)


@pytest.mark.parametrize(
    ("available", "must", "size", "target", "expected"),
    [
        (ids(CARD_A, 0, 1, 2) + ids(CARD_B, 0, 1, 2), [], 2, B, ids(CARD_B, 0, 1)),
        (ids(CARD_A, 0, 1, 2) + ids(CARD_B, 0), [], 2, B, ids(CARD_A, 0, 1)),
        (ids(CARD_A, 0, 1, 2) + ids(CARD_B, 5, 6), [], 2, None, ids(CARD_B, 5, 6)),
        (ids(CARD_A, 0, 1, 2) + ids(CARD_B, 0, 1, 2), ids(CARD_A, 2), 2, B, ids(CARD_A, 2, 0)),
        (ids(CARD_A, 0) + ids(CARD_B, 0), [], 2, A, []),
        (ids(CARD_A, 10, 9, 2), [], 2, A, ids(CARD_A, 2, 9)),
    ],
    ids=[
        "target-card",
        "target-full-so-binpack",
        "binpack-fullest",
        "must-include-wins",
        "no-card-fits",
        "lowest-units",
    ],
)
def test_preference(
    available: list[str], must: list[str], size: int, target: CardUUID | None, expected: list[str]
) -> None:
    assert allocation.preferred(available, must, size, target=target) == expected
