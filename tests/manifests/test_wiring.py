"""The manifests agree with the code and with each other: flags, configuration, names, ports."""

import argparse
import importlib
import importlib.util
import urllib.parse
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from pydantic import BaseModel

from gpushare import cli
from gpushare.core import config, names
from tests import cluster
from tests.manifests import policy
from tests.manifests.conftest import Objects
from tests.manifests.render import MANIFESTS, find

CONFIG_DIR: Final = "/etc/gpushare/config"


def _gpushare_containers(objects: Objects) -> list[policy.Container]:
    return [
        c for c in policy.containers(objects) if c.spec["image"].split(":")[0].endswith("gpushare")
    ]


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _flatten(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        section = isinstance(value, dict) and value  # an empty mapping is a setting (card_costs)
        keys |= _flatten(value, f"{prefix}{key}.") if section else {f"{prefix}{key}"}
    return keys


def test_the_shared_configuration_is_valid_and_names_every_setting(base: Objects) -> None:
    configmap = find(base, "ConfigMap", names.CONFIGMAP)
    assert configmap["metadata"]["namespace"] == names.NAMESPACE
    data = yaml.safe_load(configmap["data"]["config.yaml"])
    settings = config.validate(data)
    missing = _keys(config.Settings) - _flatten(data)
    assert not missing, f"add to manifests/config/config.yaml (with a comment): {sorted(missing)}"
    assert settings == config.Settings(), (
        "the shipped configuration should be the documented defaults"
    )


def test_every_gpushare_container_reads_the_shared_configuration(base: Objects) -> None:
    containers = _gpushare_containers(base)
    assert containers
    for container in containers:
        if container.spec.get("command"):
            continue  # the certs Job runs a script, not a part
        env = {e["name"]: e.get("value") for e in container.spec.get("env", [])}
        assert env.get(names.ENV_CONFIG_FILE) == f"{CONFIG_DIR}/config.yaml", container.where
        mounts = {m["mountPath"]: m["name"] for m in container.spec.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in container.pod.get("volumes", [])}
        volume = volumes[mounts[CONFIG_DIR]]
        assert volume["configMap"]["name"] == names.CONFIGMAP, container.where


def test_every_part_is_started_with_flags_it_accepts(base: Objects) -> None:
    started = set()
    for container in _gpushare_containers(base):
        if container.spec.get("command"):
            continue
        part, *flags = container.spec["args"]
        module = importlib.import_module(cli.PARTS[part][0])
        parser = argparse.ArgumentParser(prog=f"gpushare {part}", exit_on_error=False)
        module.add_arguments(parser)
        try:
            parser.parse_args(flags)
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"{container.where}: gpushare {part} refuses {flags}: {exc}")
        started.add(part)
    assert started == {"scheduler", "webhook", "device-plugin"}


def _flag(container: policy.Container, flag: str) -> str:
    for arg in container.spec.get("args", []):
        if arg.startswith(f"{flag}="):
            return str(arg.split("=", 1)[1])
    raise LookupError(f"{container.where}: no {flag}=")


def _container(objects: Objects, kind: str, workload: str, name: str) -> policy.Container:
    for container in policy.containers(objects):
        if (container.kind, container.workload, container.name) == (kind, workload, name):
            return container
    raise LookupError(name)


def _scheduler_config(objects: Objects) -> dict[str, Any]:
    configmap = find(objects, "ConfigMap", "gpushare-scheduler-config")
    parsed: dict[str, Any] = yaml.safe_load(configmap["data"]["kube-scheduler-config.yaml"])
    return parsed


def test_kube_scheduler_reaches_the_extender_over_loopback(base: Objects) -> None:
    parsed = _scheduler_config(base)
    assert [p["schedulerName"] for p in parsed["profiles"]] == [names.SCHEDULER_NAME]
    (extender,) = parsed["extenders"]
    url = urllib.parse.urlsplit(extender["urlPrefix"])
    assert url.hostname == "127.0.0.1"
    sidecar = _container(base, "Deployment", "gpushare-scheduler", "extender")
    listen_port = int(_flag(sidecar, "--listen").rsplit(":", 1)[1])
    assert url.port == listen_port
    assert url.path == config.Settings().scheduler.url_prefix
    assert {"name": names.RESOURCE_GPU_MEMORY, "ignoredByScheduler": False} in extender[
        "managedResources"
    ]
    assert "kubeconfig" not in (parsed.get("clientConnection") or {}), "in-cluster config expected"


def test_kube_scheduler_leader_election_matches_its_role(base: Objects) -> None:
    election = _scheduler_config(base)["leaderElection"]
    assert election["leaderElect"] is True
    role = find(base, "Role", "gpushare-scheduler:leader-election")
    assert role["metadata"]["namespace"] == election["resourceNamespace"]
    named = [rule for rule in role["rules"] if rule.get("resourceNames")]
    assert named[0]["resourceNames"] == [election["resourceName"]]


def test_the_kube_scheduler_image_is_the_tested_kubernetes_release(base: Objects) -> None:
    image = _container(base, "Deployment", "gpushare-scheduler", "kube-scheduler").spec["image"]
    kubernetes, _ = cluster.pinned_versions()
    assert image == f"registry.k8s.io/kube-scheduler:{kubernetes}"


def _ports(container: policy.Container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.spec.get("ports", [])}


@pytest.mark.parametrize(
    ("kind", "workload", "name", "flag"),
    [
        ("Deployment", "gpushare-scheduler", "extender", "--listen"),
        ("Deployment", "gpushare-webhook", "webhook", "--probe-listen"),
        ("DaemonSet", "gpushare-device-plugin", "device-plugin", "--metrics-listen"),
    ],
    ids=["extender", "webhook", "device-plugin"],
)
def test_probes_and_scrape_annotations_hit_the_metrics_port(
    base: Objects, kind: str, workload: str, name: str, flag: str
) -> None:
    container = _container(base, kind, workload, name)
    port = int(_flag(container, flag).rsplit(":", 1)[1])
    ports = _ports(container)
    assert port in ports.values()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        target = container.spec[probe]["httpGet"]["port"]
        assert ports.get(target, target) == port, f"{probe} of {container.where}"
    annotations = find(base, kind, workload)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_webhook_service_certificate_and_configurations_agree(
    base: Objects, cert_manager: Objects
) -> None:
    service = find(base, "Service", "gpushare-webhook")
    https = {p["name"]: p for p in service["spec"]["ports"]}["https"]
    webhook = _container(base, "Deployment", "gpushare-webhook", "webhook")
    assert https["targetPort"] in _ports(webhook)
    assert _ports(webhook)[https["targetPort"]] == int(_flag(webhook, "--listen").rsplit(":", 1)[1])
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for hook in find(base, kind, "gpushare-webhook")["webhooks"]:
            ref = hook["clientConfig"]["service"]
            assert (ref["name"], ref["namespace"], ref.get("port", 443)) == (
                "gpushare-webhook",
                names.NAMESPACE,
                https["port"],
            )
    tls = {v["name"]: v for v in webhook.pod["volumes"]}["tls"]["secret"]["secretName"]
    certificate = find(cert_manager, "Certificate", "gpushare-webhook")["spec"]
    assert certificate["secretName"] == tls
    installer = _load_installer()
    assert tls == installer.SECRET
    assert certificate["dnsNames"] == installer.service_names("gpushare-webhook", names.NAMESPACE)


def test_the_certs_job_and_cronjob_run_the_same_pod(base: Objects) -> None:
    job = find(base, "Job", "gpushare-webhook-certs")["spec"]["template"]
    cron = find(base, "CronJob", "gpushare-webhook-certs")["spec"]["jobTemplate"]["spec"][
        "template"
    ]
    assert job == cron


def test_cert_manager_replaces_the_certs_job(cert_manager: Objects) -> None:
    leftovers = [
        o["kind"] for o in cert_manager if o["metadata"]["name"] == "gpushare-webhook-certs"
    ]
    assert leftovers == []
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        annotations = find(cert_manager, kind, "gpushare-webhook")["metadata"]["annotations"]
        assert annotations["cert-manager.io/inject-ca-from"] == "gpushare-system/gpushare-webhook"


def test_the_device_plugin_runs_on_shared_nodes_with_kubelets_sockets(base: Objects) -> None:
    daemonset = find(base, "DaemonSet", "gpushare-device-plugin")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {names.LABEL_ENABLED: "true"}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    settings = config.Settings()
    plugin = _container(base, "DaemonSet", "gpushare-device-plugin", "device-plugin")
    kubelet = Path(_flag(plugin, "--kubelet-dir"))
    cgroup = host_paths.pop("cgroup")
    assert set(host_paths.values()) == {
        str(kubelet / "device-plugins"),
        str(kubelet / "pod-resources"),
        str(settings.agent.mps_root),
    }
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert set(host_paths.values()) <= set(mounts.values()), (
        "mounted at the host's own paths, which Allocate hands to kubelet"
    )
    # MPS daemons move into a cgroup of the host's hierarchy, where they outlive the plugin's pod.
    assert cgroup == "/sys/fs/cgroup"
    assert Path(_flag(plugin, "--mps-cgroup")).parent == Path(mounts["cgroup"])
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def _load_installer() -> Any:
    path = MANIFESTS / "webhook" / "install_certs.py"
    spec = importlib.util.spec_from_file_location("install_certs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
