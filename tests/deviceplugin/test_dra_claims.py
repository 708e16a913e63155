"""Preparing claims on the node, from allocations as kube-scheduler writes them.

The claims come from a :class:`DraApi` that answers canned objects (the interface the plugin reads
the API through); the agent is the real one on the fake NVML and fake MPS control.
"""

from pathlib import Path
from typing import Any

import pytest

from gpushare.core import dra, errors, names
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import mps
from gpushare.deviceplugin.dra import cdi
from gpushare.deviceplugin.dra.claims import Claims
from tests.deviceplugin.conftest import CARD_A, AgentFactory, make_settings

GI = 1024**3


class Claimed:
    """A DraApi whose claims are set by the test."""

    def __init__(self) -> None:
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}

    def allocate(self, name: str, uid: str, *, consumed: int, node: str = "gpu-node") -> None:
        self.claims[("ns", name)] = {
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "status": {
                "allocation": {
                    "devices": {
                        "results": [
                            {
                                "driver": names.DRA_DRIVER,
                                "pool": node,
                                "device": "gpu-0",
                                "request": names.DRA_REQUEST_NAME,
                                "shareID": f"share-{uid}",
                                "consumedCapacity": {"memory": str(consumed)},
                            }
                        ]
                    }
                }
            },
        }

    async def apply_slice(self, body: Any) -> None:
        raise AssertionError("not used")

    async def slice_exists(self, name: str) -> bool:
        raise AssertionError("not used")

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        return self.claims[(namespace, name)]

    async def gpu_memory_allocatable(self, node: str) -> int:
        raise AssertionError("not used")

    async def node_labels(self, node: str) -> dict[str, str]:
        raise AssertionError("not used")


def _consumed(granted: int) -> int:
    return dra.request_bytes(granted, unit_bytes=GI, overhead_bytes=66 * 1024**2)


@pytest.fixture
async def claims(make_agent: AgentFactory, short_tmp: Path) -> tuple[Claims, Claimed]:
    settings = make_settings(short_tmp).model_copy(update={"backend": "dra"})
    agent = make_agent(settings=settings)
    await agent.start()
    api = Claimed()
    return Claims(agent, api, cdi_dir=short_tmp / "cdi"), api


async def test_a_claim_is_granted_once_and_forgotten_on_unprepare(
    claims: tuple[Claims, Claimed], short_tmp: Path
) -> None:
    prepared, api = claims
    api.allocate("a", "uid-a", consumed=_consumed(20 * GI))
    first = await prepared.prepare("ns", "a", "uid-a")
    assert first.grant.card == CARD_A
    assert first.grant.granted_bytes == 20 * GI
    assert await prepared.prepare("ns", "a", "uid-a") == first
    assert prepared.held() == {first.grant.key: first.grant}
    await prepared.unprepare("uid-a")
    assert prepared.held() == {}
    assert not cdi.path(short_tmp / "cdi", "uid-a").exists()


async def test_unprepare_stops_the_claims_mps_daemon_at_once(
    make_agent: AgentFactory, short_tmp: Path
) -> None:
    # kubelet unprepares a claim once no container uses it, and the allocator gives its capacity
    # (the MPS server's share included) to the next claim at once: the daemon must not linger
    # for the release grace the device plugin's grants need.
    agent = make_agent(settings=make_settings(short_tmp).model_copy(update={"backend": "dra"}))
    await agent.start()
    api = Claimed()
    prepared = Claims(agent, api, cdi_dir=short_tmp / "cdi")
    api.allocate("a", "uid-a", consumed=_consumed(20 * GI))
    grant = (await prepared.prepare("ns", "a", "uid-a")).grant
    assert agent.mode.servers_on(CardUUID(CARD_A)) == 1
    daemon = agent.settings.agent.mps_root / grant.key
    assert mps.alive(daemon)
    await prepared.unprepare("uid-a")
    assert agent.mode.servers_on(CardUUID(CARD_A)) == 0
    assert not mps.alive(daemon)


async def test_the_node_refuses_what_the_card_cannot_hold_even_if_allocated(
    claims: tuple[Claims, Claimed],
) -> None:
    prepared, api = claims
    api.allocate("a", "uid-a", consumed=_consumed(60 * GI))
    api.allocate("b", "uid-b", consumed=_consumed(30 * GI))
    await prepared.prepare("ns", "a", "uid-a")
    with pytest.raises(errors.NoFit, match="cannot take 30 GiB"):
        await prepared.prepare("ns", "b", "uid-b")


async def test_a_claim_of_another_node_is_refused(claims: tuple[Claims, Claimed]) -> None:
    prepared, api = claims
    api.allocate("a", "uid-a", consumed=_consumed(20 * GI), node="other-node")
    with pytest.raises(errors.BadRequest, match="has 0 devices of gpu-node"):
        await prepared.prepare("ns", "a", "uid-a")


async def test_a_cdi_folder_it_cannot_write_refuses_the_claim_and_books_nothing(
    make_agent: AgentFactory, short_tmp: Path
) -> None:
    settings = make_settings(short_tmp).model_copy(update={"backend": "dra"})
    agent = make_agent(settings=settings)
    await agent.start()
    api = Claimed()
    api.allocate("a", "uid-a", consumed=_consumed(20 * GI))
    blocked = short_tmp / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(errors.Conflict, match="cannot write the CDI spec"):
        await Claims(agent, api, cdi_dir=blocked).prepare("ns", "a", "uid-a")
    assert agent.granted_on(CardUUID(CARD_A)) == 0


async def test_a_prepared_claim_stays_granted_and_served_past_the_release_grace(
    make_agent: AgentFactory, short_tmp: Path
) -> None:
    now = [1000.0]
    settings = make_settings(short_tmp).model_copy(update={"backend": "dra"})
    agent = make_agent(settings=settings, clock=lambda: now[0])
    agent.podresources = None  # as with backend dra: no device-plugin IDs to ask kubelet about
    await agent.start()
    api = Claimed()
    prepared = Claims(agent, api, cdi_dir=short_tmp / "cdi")
    api.allocate("a", "uid-a", consumed=_consumed(60 * GI))
    api.allocate("b", "uid-b", consumed=_consumed(30 * GI))
    await prepared.prepare("ns", "a", "uid-a")
    servers = agent.mode.servers_on(CardUUID(CARD_A))
    now[0] += mps.RELEASE_GRACE_SECONDS + 1
    await agent.reconcile()
    assert agent.granted_on(CardUUID(CARD_A)) == 60 * GI
    assert agent.mode.servers_on(CardUUID(CARD_A)) == servers > 0
    with pytest.raises(errors.NoFit, match="cannot take 30 GiB"):
        await prepared.prepare("ns", "b", "uid-b")
    await prepared.unprepare("uid-a")
    now[0] += mps.RELEASE_GRACE_SECONDS + 1
    await agent.reconcile()
    assert agent.granted_on(CardUUID(CARD_A)) == 0
    assert agent.mode.servers_on(CardUUID(CARD_A)) == 0
