"""The DRA backend's containers are judged like the device plugin's: a container that uses a claim
prepared on this node is held to that claim's grant by the watchdog, the escape checks and the
exporter, through the pod's claims (no PodResources device IDs exist for claims)."""

from pathlib import Path

import pytest

from gpushare.core.ids import CardUUID, DeviceID
from gpushare.core.quantities import GI
from gpushare.deviceplugin.allocation import Grant
from gpushare.deviceplugin.pods import PodInfo
from gpushare.deviceplugin.watchdog import CgroupLocator
from tests.deviceplugin.conftest import CARD_A, AgentFactory, StaticPods, card, write_fake
from tests.deviceplugin.test_watchdog import CID, UID, write_proc


def _pod(*, claim_status: bool = True) -> dict[str, object]:
    return {
        "metadata": {"namespace": "ns", "name": "bloom", "uid": UID},
        "spec": {
            "nodeName": "gpu-node",
            "resourceClaims": [
                {"name": "gpu", "resourceClaimTemplateName": "gpushare-gpu-memory-4"},
                {"name": "fixed", "resourceClaimName": "shared-claim"},
            ],
            "containers": [
                {"name": "kserve-container", "resources": {"claims": [{"name": "gpu"}]}},
                {"name": "sidecar", "resources": {"claims": [{"name": "fixed"}]}},
                {"name": "plain"},
            ],
        },
        "status": {
            "phase": "Running",
            "resourceClaimStatuses": (
                [{"name": "gpu", "resourceClaimName": "bloom-gpu-x7k2p"}] if claim_status else []
            ),
            "containerStatuses": [
                {"name": "kserve-container", "containerID": f"containerd://{CID}"}
            ],
        },
    }


def test_a_pod_names_the_claims_of_each_container_made_from_templates_or_named() -> None:
    info = PodInfo.from_api(_pod())
    assert info.claims == {
        "kserve-container": ("ns/bloom-gpu-x7k2p",),
        "sidecar": ("ns/shared-claim",),
    }
    # Before the ResourceClaim controller has made the claim, the template's is not known yet.
    assert PodInfo.from_api(_pod(claim_status=False)).claims == {"sidecar": ("ns/shared-claim",)}


@pytest.mark.parametrize("prepared", [True, False])
async def test_a_container_over_its_claims_grant_is_reported(
    make_agent: AgentFactory, nvml_file: Path, short_tmp: Path, prepared: bool
) -> None:
    pods = StaticPods([PodInfo.from_api(_pod())])
    agent = make_agent(
        isolation="none",
        pods=pods,
        locator=CgroupLocator(short_tmp / "proc"),
        overuse_grace_seconds=0,
    )
    grant = Grant(card=CardUUID(CARD_A), devices=(DeviceID("claim-uid"),), granted_bytes=4 * GI)
    if prepared:
        agent.claim_grants = lambda: {"ns/bloom-gpu-x7k2p": grant}
    write_proc(short_tmp / "proc", 4242, UID, CID)
    write_fake(
        nvml_file, [card(CARD_A, 0)], processes=[{"pid": 4242, "card": CARD_A, "used": "5Gi"}]
    )
    await agent.poll()
    await agent.published()
    registry = agent.metrics.registry
    labels = {
        "node": "gpu-node", "namespace": "ns", "pod": "bloom", "container": "kserve-container",
        "gpu_uuid": CARD_A, "gpu_index": "0",
    }  # fmt: skip
    granted = registry.get_sample_value("gpushare_container_granted_bytes", labels)
    violations = registry.get_sample_value(
        "gpushare_grant_violations_total",
        {"node": "gpu-node", "namespace": "ns", "pod": "bloom", "container": "kserve-container"},
    )
    if prepared:
        assert granted == 4 * GI
        assert violations == 1
        assert ("ns/bloom", "kserve-container") in agent.holders()
    else:  # a claim prepared elsewhere (or not yet): nothing here to hold the container to
        assert violations is None
        assert ("ns/bloom", "kserve-container") not in agent.holders()
