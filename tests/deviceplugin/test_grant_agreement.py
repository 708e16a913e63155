"""The webhook's ceiling, the extender's fit and the device plugin's capacity agree by
construction (:mod:`gpushare.core.grants`): for any card and any isolation, the largest grant the
webhook accepts is placed by the extender and offered by the plugin, and one unit more is refused
by all three."""

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpushare.core import config, grants, nodereport, quantities
from gpushare.core.ids import CardUUID, NodeName, pod_key
from gpushare.scheduler import demand, ledger
from gpushare.webhook import validation
from tests.deviceplugin.conftest import CARD_A, AgentFactory, card, make_settings, write_fake

GI, MI = quantities.GI, quantities.MI
NODE = NodeName("n")


def webhook_accepts(value: int, cuda_total: int, settings_: config.Settings) -> bool:
    accepted, reasons, _ = validation.memory_bytes(
        f"{value}", settings=settings_, largest_cuda_total_bytes=cuda_total
    )
    return accepted is not None and not reasons


def extender_places(value: int, cuda_total: int, settings_: config.Settings) -> bool:
    book = ledger.Ledger(
        overhead_bytes=settings_.allocation_overhead_bytes,
        card_overhead_bytes=settings_.card_overhead_bytes,
        heartbeat_timeout_seconds=1e12,
        clock=lambda: 0.0,
    )
    reading = nodereport.CardReport(
        uuid=CardUUID(CARD_A), index=0, model="NVIDIA H100 80GB HBM3", total_bytes=cuda_total,
        reserved_bytes=0, used_bytes=0, free_bytes=cuda_total, healthy=True,
    )  # fmt: skip
    book.set_node(
        NODE, nodereport.NodeReport(heartbeat=datetime.fromtimestamp(0, UTC), cards=(reading,))
    )
    units = value // settings_.unit_bytes
    request = demand.PodRequest(
        str(uuid.uuid4()), pod_key("ns", "p"), (demand.Demand("main", units, value),)
    )
    return book.check(NODE, request, policy="fill", now=0.0) is None


CARDS = st.integers(min_value=2 * GI, max_value=200 * GI)
UNITS = st.sampled_from([256 * MI, 512 * MI, GI, 2 * GI])


@settings(max_examples=300, deadline=None)
@given(
    cuda_total=CARDS, unit=UNITS, isolation=st.sampled_from(["mps", "mps-shared", "cgroup", "none"])
)
def test_the_webhook_and_the_extender_draw_the_same_line(
    cuda_total: int, unit: int, isolation: str
) -> None:
    settings_ = config.validate({"unit_bytes": unit, "isolation": isolation})
    largest = grants.largest_grant_bytes(cuda_total, unit, settings_.overheads)
    if largest < 2 * unit or largest <= settings_.reserve_bytes:
        return  # a card too small for any grant the webhook takes
    assert webhook_accepts(largest, cuda_total, settings_)
    assert extender_places(largest, cuda_total, settings_)
    assert not webhook_accepts(largest + unit, cuda_total, settings_)
    assert not extender_places(largest + unit, cuda_total, settings_)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuda_total=CARDS, unit=UNITS, isolation=st.sampled_from(["mps", "mps-shared", "cgroup", "none"])
)
def test_the_plugin_offers_exactly_the_largest_grant_of_an_idle_card(
    make_agent: AgentFactory,
    nvml_file: Path,
    short_tmp: Path,
    cuda_total: int,
    unit: int,
    isolation: str,
) -> None:
    write_fake(nvml_file, [card(CARD_A, 0, total=cuda_total, reserved=0, memory_limits=True)])
    base = make_settings(short_tmp, isolation=isolation)
    agent = make_agent(settings=base.model_copy(update={"unit_bytes": unit}))

    async def offered() -> int:
        await agent.start()
        return sum(1 for _, healthy in agent.device_list() if healthy)

    units = asyncio.run(offered())
    assert agent.mode.name == isolation
    assert units * unit == grants.largest_grant_bytes(cuda_total, unit, agent.settings.overheads)


def test_auto_counts_an_mps_server_per_grant_the_most_any_node_may_need() -> None:
    for isolation in ("mps", "mps-shared", "cgroup", "none"):
        chosen = config.validate({"isolation": isolation}).overheads
        auto = config.validate({"isolation": "auto"}).overheads
        assert auto.per_card + auto.per_allocation >= chosen.per_card + chosen.per_allocation
