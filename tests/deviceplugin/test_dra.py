"""The DRA backend's node side against the real API server and kube-scheduler: the agent publishes
its slice, kube-scheduler allocates a claim from it, a test kubelet prepares the claim over the
plugin's sockets, and the container gets the environment the device plugin's Allocate gives."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import config, dra, errors, names
from gpushare.core.config import Settings
from gpushare.deviceplugin import kube
from gpushare.deviceplugin.agent import Agent
from gpushare.deviceplugin.dra import cdi
from gpushare.deviceplugin.dra import main as dra_main
from gpushare.deviceplugin.dra import publisher as publisher_module
from gpushare.deviceplugin.dra.kube import KubeDraApi
from gpushare.deviceplugin.dra.publisher import Publisher, check_exclusive
from gpushare.simulator.drakubelet import DraKubelet
from tests import cluster
from tests.deviceplugin.conftest import (
    CARD_A,
    CARD_B,
    AgentFactory,
    card,
    make_settings,
    running,
    write_fake,
)
from tests.deviceplugin.kubelet import TestKubelet
from tests.dra import objects
from tests.webhook import builders

RESOURCE = objects.RESOURCE


@pytest.fixture
async def dra_api(control_plane: cluster.ControlPlane) -> AsyncIterator[KubeDraApi]:
    node_api = await kube.KubeApi.connect(control_plane.kubeconfig)
    yield KubeDraApi(node_api.api_client)
    await node_api.close()


@pytest.fixture
def node(control_plane: cluster.ControlPlane, namespace: str) -> Iterator[str]:
    name = cluster.unique_name("dra-node", max_len=30)
    cluster.register_gpu_node(
        control_plane, name, [cluster.gpu_card(0)], gpu_units=0, owner=namespace
    )
    yield name
    objects.delete_slices(control_plane.rest(), [name])


def dra_settings(root: Path) -> Settings:
    settings = make_settings(root, cdi_spec_dir=str(root / "cdi"))
    return settings.model_copy(update={"backend": "dra"})


@contextlib.asynccontextmanager
async def serving(agent: Agent, api: KubeDraApi, kubelet_dir: Path) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(
        dra_main.serve(agent, api=api, kubelet_dir=kubelet_dir)
    )
    try:
        yield
    finally:
        agent.nvml.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def read_slice(rest: cluster.Rest, node: str) -> dict[str, Any] | None:
    try:
        return rest.get(f"{RESOURCE}/resourceslices/{dra.slice_name(node)}")
    except cluster.ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def wait(probe: Any, what: str, timeout: float = 30.0) -> Any:
    """Await a blocking probe off the loop until it returns something."""
    return await asyncio.to_thread(cluster.wait_for, probe, timeout=timeout, what=what)


async def test_the_agent_publishes_its_healthy_cards_and_republishes_on_change(
    control_plane: cluster.ControlPlane,
    node: str,
    dra_api: KubeDraApi,
    make_agent: AgentFactory,
    short_tmp: Path,
    nvml_file: Path,
) -> None:
    rest = control_plane.rest()
    agent = make_agent(node=node, settings=dra_settings(short_tmp))
    await agent.poll()
    publisher = Publisher(dra_api, node=node, settings=agent.settings)
    assert await publisher.offer(agent.card_reports())
    first = read_slice(rest, node)
    assert first is not None
    devices = first["spec"]["devices"]
    assert [d["attributes"]["uuid"]["string"] for d in devices] == [CARD_A, CARD_B]
    assert devices[0]["capacity"]["memory"]["value"] == "79Gi"
    assert not await publisher.offer(agent.card_reports())  # nothing changed: nothing written

    write_fake(nvml_file, [card(CARD_A, 0), card(CARD_B, 1, error="GPU is lost")])
    await agent.poll()
    assert await publisher.offer(agent.card_reports())
    second = read_slice(rest, node)
    assert second is not None
    assert [d["name"] for d in second["spec"]["devices"]] == ["gpu-0"]
    assert second["spec"]["pool"]["generation"] > first["spec"]["pool"]["generation"]


async def test_a_slice_deleted_under_the_agent_is_written_again(
    control_plane: cluster.ControlPlane,
    node: str,
    dra_api: KubeDraApi,
    make_agent: AgentFactory,
    short_tmp: Path,
) -> None:
    # kubelet deletes every ResourceSlice of its node when it starts, and a driver's 30 s after
    # it unregisters: the node's cards must not stay unoffered until a card changes.
    rest = control_plane.rest()
    now = [1000.0]
    agent = make_agent(node=node, settings=dra_settings(short_tmp))
    await agent.poll()
    publisher = Publisher(dra_api, node=node, settings=agent.settings, clock=lambda: now[0])
    assert await publisher.offer(agent.card_reports())
    generation = read_slice(rest, node)["spec"]["pool"]["generation"]  # type: ignore[index]

    rest.delete(f"{RESOURCE}/resourceslices/{dra.slice_name(node)}")
    publisher.forget()  # kubelet registered the plugin again: its start may have wiped the slice
    assert await publisher.offer(agent.card_reports())
    again = read_slice(rest, node)
    assert again is not None
    assert again["spec"]["pool"]["generation"] == generation  # same devices, same generation

    rest.delete(f"{RESOURCE}/resourceslices/{dra.slice_name(node)}")  # with no word from kubelet
    assert not await publisher.offer(agent.card_reports())
    now[0] += publisher_module.RESYNC_SECONDS
    assert await publisher.offer(agent.card_reports())
    assert read_slice(rest, node) is not None


async def test_each_backend_refuses_a_node_the_other_serves(
    control_plane: cluster.ControlPlane, namespace: str, dra_api: KubeDraApi
) -> None:
    rest = control_plane.rest()
    extender_node = cluster.unique_name("ext-node", max_len=30)
    cluster.register_gpu_node(rest, extender_node, [cluster.gpu_card(0)], owner=namespace)
    with pytest.raises(errors.ConfigError, match=r"offers 80 gpushare.io/gpu-memory units"):
        await check_exclusive(dra_api, node=extender_node, backend="dra")
    await check_exclusive(dra_api, node=extender_node, backend="extender")

    dra_node = cluster.unique_name("dra-node", max_len=30)
    cluster.register_gpu_node(rest, dra_node, [cluster.gpu_card(0)], gpu_units=0, owner=namespace)
    objects.publish_slice(
        rest, dra_node, [cluster.gpu_card(0)], unit_bytes=config.Settings().unit_bytes, overhead=0
    )
    try:
        with pytest.raises(errors.ConfigError, match=r"has ResourceSlice .* of the DRA backend"):
            await check_exclusive(dra_api, node=dra_node, backend="extender")
        await check_exclusive(dra_api, node=dra_node, backend="dra")
    finally:
        objects.delete_slices(rest, [dra_node])


async def test_a_claim_kube_scheduler_allocated_is_prepared_with_the_device_plugins_environment(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    dra_api: KubeDraApi,
    make_agent: AgentFactory,
    kubelet: TestKubelet,
    short_tmp: Path,
    nvml_file: Path,
) -> None:
    rest = control_plane.rest()
    write_fake(nvml_file, [card(CARD_A, 0)])  # one card: both paths grant on the same one
    objects.install_device_class(rest)
    settings = dra_settings(short_tmp)
    kubelet_dir = short_tmp / "dra-kubelet"
    dra_agent = make_agent(node=node, settings=settings)
    dra_kubelet = DraKubelet(kubelet_dir)
    with control_plane.start_scheduler():
        async with serving(dra_agent, dra_api, kubelet_dir):
            await wait(lambda: read_slice(rest, node), "the node's ResourceSlice")
            pod = objects.create_pod(rest, namespace, "20Gi", builders.FIXTURES[1])
            path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
            bound = await wait(
                lambda: (p := rest.get(path))["spec"].get("nodeName") and p, "the pod bound"
            )
            (status,) = bound["status"]["resourceClaimStatuses"]
            claim = rest.get(
                f"{RESOURCE}/namespaces/{namespace}/resourceclaims/{status['resourceClaimName']}"
            )
            uid, name = claim["metadata"]["uid"], claim["metadata"]["name"]

            info = await dra_kubelet.register()
            assert info.name == names.DRA_DRIVER
            registry = dra_agent.metrics.registry
            registered = registry.get_sample_value(
                "gpushare_device_plugin_registered", {"node": node}
            )
            assert registered == 1  # the alert on an unregistered plugin stays quiet
            answer = await dra_kubelet.prepare(namespace, name, uid)
            assert answer.error == ""
            (device,) = answer.devices
            (result,) = claim["status"]["allocation"]["devices"]["results"]
            assert (device.pool_name, device.device_name) == (node, "gpu-0")
            assert list(device.request_names) == [names.DRA_REQUEST_NAME]
            assert device.share_id == result["shareID"]
            assert list(device.cdi_device_ids) == [cdi.device_id(uid)]
            # kubelet retries a prepare it did not see answered: the same answer again
            again = await dra_kubelet.prepare(namespace, name, uid)
            assert list(again.devices) == list(answer.devices)

            spec_file = cdi.path(settings.agent.cdi_spec_dir, uid)
            edits = json.loads(spec_file.read_text())["devices"][0]["containerEdits"]
            dra_env = dict(item.split("=", 1) for item in edits["env"])
            assert edits["mounts"][0]["hostPath"] == dra_env[names.ENV_MPS_PIPE_DIRECTORY]

            assert await dra_kubelet.unprepare(namespace, name, uid) == ""
            assert not spec_file.exists()
            await dra_kubelet.close()

    # The device plugin's Allocate for the same grant on the same card.
    plugin_agent = make_agent(node=node)
    async with running(plugin_agent, kubelet):
        response = await kubelet.admit(namespace, "same-grant", "kserve-container", 20)
    plugin_env = dict(response.envs)
    pipe = names.ENV_MPS_PIPE_DIRECTORY  # one daemon per grant: its folder is named after it
    assert {k: v for k, v in dra_env.items() if k != pipe} == {
        k: v for k, v in plugin_env.items() if k != pipe
    }
    assert dra_env[names.ENV_GRANTED_BYTES] == str(20 * 1024**3)
    assert dra_env[names.ENV_MPS_MEM_LIMIT] == f"{CARD_A}=20480M"
    assert Path(dra_env[pipe]).parent == Path(plugin_env[pipe]).parent


async def test_a_claim_of_another_node_or_a_replaced_claim_is_refused_by_name(
    control_plane: cluster.ControlPlane,
    namespace: str,
    node: str,
    dra_api: KubeDraApi,
    make_agent: AgentFactory,
    short_tmp: Path,
) -> None:
    rest = control_plane.rest()
    objects.install_device_class(rest)
    kubelet_dir = short_tmp / "dra-kubelet"
    dra_kubelet = DraKubelet(kubelet_dir)
    claim = rest.create(
        f"{RESOURCE}/namespaces/{namespace}/resourceclaims",
        {
            "apiVersion": names.DRA_API_VERSION,
            "kind": "ResourceClaim",
            "metadata": {"name": "unallocated"},
            "spec": dra.claim_spec(20 * 1024**3, unit_bytes=1024**3, overhead_bytes=0),
        },
    )
    async with serving(
        make_agent(node=node, settings=dra_settings(short_tmp)), dra_api, kubelet_dir
    ):
        await dra_kubelet.register()
        answer = await dra_kubelet.prepare(namespace, "unallocated", claim["metadata"]["uid"])
        assert "has 0 devices of" in answer.error
        answer = await dra_kubelet.prepare(namespace, "unallocated", "not-its-uid")
        assert "it was replaced" in answer.error
        await dra_kubelet.close()
