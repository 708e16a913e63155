"""``manifests/dra/``: the DRA backend's install, rendered as ``kubectl apply -k`` would."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from gpushare.core import config, names
from tests.manifests.conftest import Objects, _render
from tests.manifests.render import MANIFESTS, find


@pytest.fixture(scope="module")
def rendered() -> Objects:
    return _render(MANIFESTS / "dra")


def _config(objects: Objects) -> dict[str, Any]:
    configmap = find(objects, "ConfigMap", names.CONFIGMAP)
    data: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return data


def test_no_extender_and_no_second_scheduler_profile(rendered: Objects) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert not [k for k in kinds if "scheduler" in k[1]]
    deployments = [o["metadata"]["name"] for o in rendered if o["kind"] == "Deployment"]
    assert deployments == ["gpushare-webhook"]


def _settings(objects: Objects, kind: str, name: str, tmp_path: Path) -> config.Settings:
    """What the part reads: the ConfigMap's file, then its container's environment."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(objects)))
    (container,) = find(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    environ[names.ENV_CONFIG_FILE] = str(tmp_path / "config.yaml")
    return config.load(environ=environ)


def test_the_configmap_is_the_bases_and_the_parts_choose_dra_and_mps(
    rendered: Objects, base: Objects, tmp_path: Path
) -> None:
    assert _config(rendered) == _config(base)
    plugin = _settings(rendered, "DaemonSet", "gpushare-device-plugin", tmp_path)
    webhook = _settings(rendered, "Deployment", "gpushare-webhook", tmp_path)
    assert plugin.backend == webhook.backend == "dra"
    # The agent's escape checks and per-cgroup backstop do not see claims yet: MPS holds them.
    assert plugin.isolation == "mps"
    assert _settings(base, "DaemonSet", "gpushare-device-plugin", tmp_path).backend == "extender"


def test_the_device_class_selects_every_device_of_the_driver(rendered: Objects) -> None:
    assert find(rendered, "DeviceClass", names.DRA_DEVICE_CLASS) == {
        "apiVersion": names.DRA_API_VERSION,
        "kind": "DeviceClass",
        "metadata": {"name": names.DRA_DEVICE_CLASS, "labels": {names.LABEL_PART_OF: "gpushare"}},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{names.DRA_DRIVER}"'}}]},
    }


def test_the_webhook_declares_its_side_effect(rendered: Objects) -> None:
    (hook,) = find(rendered, "MutatingWebhookConfiguration", "gpushare-webhook")["webhooks"]
    assert hook["sideEffects"] == "NoneOnDryRun"


def test_the_agent_reaches_kubelets_plugin_folders_and_the_cdi_folder(rendered: Objects) -> None:
    daemonset = find(rendered, "DaemonSet", "gpushare-device-plugin")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    settings = config.validate(_config(rendered))
    kubelet = settings.agent.kubelet_dir
    assert {
        str(kubelet / "plugins_registry"),
        str(kubelet / "plugins"),
        str(settings.agent.cdi_spec_dir),
    } <= mounted


def test_each_part_may_do_what_the_dra_backend_asks_of_it(rendered: Objects) -> None:
    def rules(name: str) -> set[tuple[str, str]]:
        role = find(rendered, "ClusterRole", name)
        return {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}

    plugin = rules("gpushare-device-plugin") | rules("gpushare-device-plugin-dra")
    assert {
        ("resourceslices", "create"),
        ("resourceslices", "patch"),
        ("resourceslices", "get"),
        ("resourceclaims", "get"),
        ("nodes", "get"),
    } <= plugin
    assert ("resourceclaimtemplates", "create") in rules("gpushare-webhook-dra")
