"""IDs kubelet should never send, and a restart before kubelet's PodResources answers: each is
refused over the real gRPC socket with a status kubelet reports, and later grants still work."""

from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpushare.core import names
from gpushare.core.ids import pod_key
from gpushare.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    GI,
    AgentFactory,
    allocate_request,
    running,
)
from tests.deviceplugin.kubelet import TestKubelet


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@pytest.mark.parametrize(
    ("ids", "says"),
    [
        ([f"{CARD_A}-500"], "never advertised"),
        (["GPU-elsewhere-0"], "never advertised"),
        ([f"{CARD_A}-3", f"{CARD_A}-03"], "not of the form"),
        ([f"{CARD_A}-3", f"{CARD_A}-3"], "name a unit twice"),
        ([f"{CARD_A}-\u0663"], "not of the form"),  # ARABIC-INDIC DIGIT THREE
        ([f"{CARD_A}-\u00b2"], "not of the form"),  # SUPERSCRIPT TWO: int() refuses it
    ],
    ids=[
        "unit past the card",
        "unknown card",
        "two spellings",
        "twice",
        "indic digit",
        "superscript",
    ],
)
async def test_ids_never_issued_are_refused_and_poison_nothing(
    make_agent: AgentFactory, kubelet: TestKubelet, ids: list[str], says: str
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        assert kubelet.stub is not None
        error = await refused(kubelet.stub.Allocate(allocate_request(*ids)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (error.details() or "")
        error = await refused(
            kubelet.stub.GetPreferredAllocation(
                dp.PreferredAllocationRequest(
                    container_requests=[
                        dp.ContainerPreferredAllocationRequest(
                            available_deviceIDs=[*ids, f"{CARD_B}-0", f"{CARD_B}-1"],
                            allocation_size=1,
                        )
                    ]
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Every unit of the card can still be granted, in one piece.
        answer = await kubelet.admit("ns", "whole", "c", 79)
        assert answer.envs[names.ENV_GRANTED_BYTES] == str(79 * GI)


async def test_ids_a_live_container_holds_are_refused(
    make_agent: AgentFactory, kubelet: TestKubelet
) -> None:
    async with running(make_agent(isolation="none"), kubelet):
        assert kubelet.stub is not None
        await kubelet.admit("ns", "holder", "c", 4)
        (held,) = kubelet.holdings[pod_key("ns", "holder")]
        error = await refused(kubelet.stub.Allocate(allocate_request(*held.devices[:2])))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "held by container c of pod ns/holder" in (error.details() or "")
        # Once kubelet has freed them (the pod is gone), the same IDs are granted.
        kubelet.release(pod_key("ns", "holder"))
        answer = await kubelet.stub.Allocate(allocate_request(*held.devices[:2]))
        assert answer.container_responses[0].envs[names.ENV_GRANTED_BYTES] == str(2 * GI)


async def test_nothing_is_granted_before_podresources_has_answered(
    make_agent: AgentFactory, kubelet: TestKubelet, short_tmp: Path
) -> None:
    # Two containers hold 70 of card A's 79 units, each under its own MPS daemon.
    async with running(make_agent(isolation="mps"), kubelet):
        await kubelet.admit("ns", "forty", "c", 40)
        await kubelet.admit("ns", "thirty", "c", 30)
    # The plugin restarts while kubelet's PodResources socket does not answer. It adopts the two
    # daemons, but does not know the grants: 9 more units and a third server would be 15 MiB past
    # the card's 79.18 GiB.
    socket = short_tmp / "kubelet" / "pod-resources" / "kubelet.sock"
    socket.rename(socket.with_suffix(".away"))
    kubelet.devices = {}
    async with running(make_agent(isolation="mps"), kubelet) as agent:
        assert kubelet.stub is not None
        rest = [f"{CARD_A}-{u}" for u in range(70, 79)]
        error = await refused(kubelet.stub.Allocate(allocate_request(*rest)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "PodResources has not answered" in (error.details() or "")
        socket.with_suffix(".away").rename(socket)
        await kubelet.wait_for(lambda: agent.holdings is not None)
        # Now the grants count: the card's last unit is refused, one less fits.
        error = await refused(kubelet.stub.Allocate(allocate_request(*rest)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        answer = await kubelet.stub.Allocate(allocate_request(*rest[:8]))
        assert answer.container_responses[0].envs[names.ENV_GRANTED_BYTES] == str(8 * GI)
