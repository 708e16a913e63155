"""A prepared claim's CDI spec: what the runtime applies, and what a restarted agent adopts."""

import json
from pathlib import Path

import pytest

from gpushare.core import names
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin.allocation import ContainerSetup, Grant, Mount
from gpushare.deviceplugin.dra import cdi

UID = "5f0c3a52-8d3e-4f7e-9a36-1d2b7c0e9f10"
CARD = CardUUID("GPU-0a0a0a0a-0000-4000-8000-00000000000a")


def _setup() -> tuple[Grant, ContainerSetup]:
    grant = Grant(card=CARD, devices=(cdi.grant_of(UID),), granted_bytes=20 * 1024**3)
    setup = ContainerSetup(
        envs={names.ENV_VISIBLE_DEVICES: CARD, names.ENV_GRANTED_BYTES: str(grant.granted_bytes)},
        mounts=(Mount(container_path="/run/mps/x", host_path="/run/mps/x"),),
    )
    return grant, setup


def test_the_spec_names_the_claim_and_carries_the_environment_and_mounts(tmp_path: Path) -> None:
    grant, setup = _setup()
    cdi.write(tmp_path, UID, cdi.spec(UID, grant, setup, claim="ns/claim"))
    body = json.loads(cdi.path(tmp_path, UID).read_text())
    assert body["kind"] == "gpu.gpushare.io/claim"
    assert cdi.device_id(UID) == f"gpu.gpushare.io/claim={UID}"
    (device,) = body["devices"]
    assert device["name"] == UID
    assert f"{names.ENV_GRANTED_BYTES}={20 * 1024**3}" in device["containerEdits"]["env"]
    assert device["containerEdits"]["mounts"] == [
        {"hostPath": "/run/mps/x", "containerPath": "/run/mps/x", "options": ["rbind", "rw"]}
    ]


def test_a_restarted_agent_adopts_the_grants_of_the_specs_it_finds(tmp_path: Path) -> None:
    grant, setup = _setup()
    cdi.write(tmp_path, UID, cdi.spec(UID, grant, setup, claim="ns/claim"))
    assert cdi.adopt(tmp_path) == {UID: (grant, "ns/claim")}
    cdi.remove(tmp_path, UID)
    assert cdi.adopt(tmp_path) == {}


def test_a_spec_it_cannot_read_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / f"{names.DRA_DRIVER}-broken.json").write_text("{not json")
    assert cdi.adopt(tmp_path) == {}
    assert "ignoring CDI spec" in caplog.text
