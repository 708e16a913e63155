"""The manifests on the real kube-apiserver: accepted, installed, and least privilege for real.

Server-side dry-run of the base and of both overlays (against the real CRDs of cert-manager and
the Prometheus operator, fetched from the Go module proxy), then ``kubectl apply -k manifests/``.
Each part then runs with a token of its own ServiceAccount and does its job, and ``kubectl auth
can-i --list`` shows each ServiceAccount nothing beyond what that part does.

The webhook configurations are deleted afterwards: with nothing serving them, they would refuse
the annotated pods of the tests that follow.
"""

import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from cryptography import x509

from gpushare.core import names
from tests import cluster
from tests.manifests import parts, rbac
from tests.manifests.render import MANIFESTS, find, render

NS: Final = names.NAMESPACE
CONFIGURATIONS: Final = ("mutatingwebhookconfiguration", "validatingwebhookconfiguration")
FORBIDDEN: Final = re.compile(r"(?<!\d)403(?!\d)|Forbidden")
"""A refusal in a part's log: status 403 as a number of its own (not inside a port), or its name."""
CERT_MANAGER: Final = ("github.com/cert-manager/cert-manager", "v1.21.2", "deploy/crds")
CERT_MANAGER_CRDS: Final = ("cert-manager.io_certificates.yaml", "cert-manager.io_issuers.yaml")
PROMETHEUS_OPERATOR: Final = (
    "github.com/prometheus-operator/prometheus-operator",
    "v0.85.0",
    "example/prometheus-operator-crd",
)
PROMETHEUS_OPERATOR_CRDS: Final = (
    "monitoring.coreos.com_podmonitors.yaml",
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
)

# What each part does with the API (read from its code), and what the stock kube-scheduler
# needs: the set a ServiceAccount must hold, and nothing more.
EXTENDER: Final = {
    ("nodes", "", "list"),
    ("nodes", "", "watch"),
    ("pods", "", "get"),
    ("pods", "", "list"),
    ("pods", "", "watch"),
    ("pods/binding", "", "create"),
    ("events.events.k8s.io", "", "create"),
}
LEADER_ELECTION: Final = {
    ("leases.coordination.k8s.io", "", "create"),
    ("leases.coordination.k8s.io", "gpushare-scheduler", "get"),
    ("leases.coordination.k8s.io", "gpushare-scheduler", "list"),
    ("leases.coordination.k8s.io", "gpushare-scheduler", "watch"),
    ("leases.coordination.k8s.io", "gpushare-scheduler", "update"),
}
WEBHOOK: Final = {
    ("nodes", "", "list"),
    ("nodes", "", "watch"),
    # kopf's resource observer
    ("customresourcedefinitions.apiextensions.k8s.io", "", "list"),
    ("customresourcedefinitions.apiextensions.k8s.io", "", "watch"),
}
DEVICE_PLUGIN: Final = {
    ("nodes", "", "get"),  # its node's gpushare.io/backend label, at start-up
    ("nodes", "", "patch"),
    ("pods", "", "list"),
    ("pods", "", "watch"),
    ("pods", "", "patch"),
    ("pods/eviction", "", "create"),
    ("events.events.k8s.io", "", "create"),
    ("resourceslices.resource.k8s.io", "", "get"),
}
CERTS: Final = {
    ("mutatingwebhookconfigurations.admissionregistration.k8s.io", "gpushare-webhook", "get"),
    ("mutatingwebhookconfigurations.admissionregistration.k8s.io", "gpushare-webhook", "patch"),
    ("validatingwebhookconfigurations.admissionregistration.k8s.io", "gpushare-webhook", "get"),
    ("validatingwebhookconfigurations.admissionregistration.k8s.io", "gpushare-webhook", "patch"),
}
CERTS_IN_NAMESPACE: Final = {
    ("secrets", "", "create"),
    ("secrets", "gpushare-webhook-tls", "get"),
    ("secrets", "gpushare-webhook-tls", "update"),
}


# --- Installation ----------------------------------------------------------------------------


def _module_crds(
    cp: cluster.ControlPlane, module: tuple[str, str, str], files: tuple[str, ...]
) -> None:
    path, version, folder = module
    root = parts.go_module(path, version)
    if root is None:
        message = f"cannot fetch {path}@{version} with `go mod download` (its CRDs)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    parts.apply_crds(cp, [parts.require(root / folder / name, f"{path} CRD") for name in files])


def _delete_configurations(cp: cluster.ControlPlane) -> None:
    for kind in CONFIGURATIONS:
        cp.kubectl("delete", kind, "gpushare-webhook", "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def prepared(control_plane: cluster.ControlPlane) -> Iterator[cluster.ControlPlane]:
    """KServe's CRDs and the namespace (a namespaced dry-run needs its namespace to exist)."""
    parts.install_kserve_crds(control_plane)
    _delete_configurations(control_plane)  # a left-over one (another test's) would merge with ours
    control_plane.kubectl("apply", "-f", str(MANIFESTS / "config" / "namespace.yaml"))
    yield control_plane
    _delete_configurations(control_plane)


@pytest.fixture(scope="module")
def installed(prepared: cluster.ControlPlane) -> cluster.ControlPlane:
    """``kubectl apply -k manifests/``, as the install guide says."""
    prepared.kubectl("apply", "-k", str(MANIFESTS))
    return prepared


@pytest.fixture
def without_webhooks(installed: cluster.ControlPlane) -> Iterator[cluster.ControlPlane]:
    """The installation with its webhook configurations set aside (nothing serves them here)."""
    _delete_configurations(installed)
    yield installed
    installed.kubectl("apply", "-k", str(MANIFESTS))


def _dry_run(cp: cluster.ControlPlane, path: Path) -> None:
    result = cp.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(path), check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(render(path))
    assert all(line.endswith("(server dry run)") for line in lines), result.stdout


def test_the_apiserver_accepts_the_manifests(prepared: cluster.ControlPlane) -> None:
    _dry_run(prepared, MANIFESTS)


@pytest.mark.parametrize("path", ["dra", "overlays/mixed"])
def test_the_apiserver_accepts_the_dra_installs(prepared: cluster.ControlPlane, path: str) -> None:
    _dry_run(prepared, MANIFESTS / path)


def test_the_apiserver_accepts_the_cert_manager_overlay(prepared: cluster.ControlPlane) -> None:
    _module_crds(prepared, CERT_MANAGER, CERT_MANAGER_CRDS)
    _dry_run(prepared, MANIFESTS / "overlays" / "cert-manager")


def test_the_apiserver_accepts_the_prometheus_operator_overlay(
    prepared: cluster.ControlPlane,
) -> None:
    _module_crds(prepared, PROMETHEUS_OPERATOR, PROMETHEUS_OPERATOR_CRDS)
    _dry_run(prepared, MANIFESTS / "overlays" / "prometheus-operator")


def test_kubectl_apply_installs_every_object(installed: cluster.ControlPlane) -> None:
    for obj in render(MANIFESTS):
        kind = obj["kind"].lower()
        args = ["get", kind, obj["metadata"]["name"], "-o", "name"]
        if obj["metadata"].get("namespace"):
            args += ["-n", obj["metadata"]["namespace"]]
        assert installed.kubectl(*args).stdout.strip(), obj["metadata"]["name"]
    # The cluster now holds exactly the manifests: an upgrade with the same files changes nothing.
    diff = installed.kubectl("diff", "-k", str(MANIFESTS), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr


# --- Least privilege -------------------------------------------------------------------------


def _can_i(cp: cluster.ControlPlane, user: str, namespace: str) -> set[rbac.Permission]:
    output = cp.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    return rbac.parse_can_i(output)


def _account(name: str) -> str:
    return f"system:serviceaccount:{NS}:{name}"


def _builtin(
    cp: cluster.ControlPlane, kind: str, name: str, namespace: str = ""
) -> set[rbac.Permission]:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    return rbac.from_rules(json.loads(cp.kubectl(*args).stdout)["rules"])


def _expected(cp: cluster.ControlPlane, account: str, namespace: str) -> set[rbac.Permission]:
    """What ``account`` must hold in ``namespace``: what its part does, nothing more."""
    if account == "gpushare-scheduler":
        expected = EXTENDER | _builtin(cp, "clusterrole", "system:kube-scheduler")
        expected |= _builtin(cp, "clusterrole", "system:volume-scheduler")
        if namespace == NS:
            expected |= LEADER_ELECTION
        if namespace == "kube-system":
            expected |= _builtin(
                cp, "role", "extension-apiserver-authentication-reader", "kube-system"
            )
        return expected
    if account == "gpushare-webhook":
        return set(WEBHOOK)
    if account == "gpushare-device-plugin":
        return set(DEVICE_PLUGIN)
    if account == "gpushare-webhook-certs":
        return CERTS | (CERTS_IN_NAMESPACE if namespace == NS else set())
    raise LookupError(account)


ACCOUNTS: Final = (
    "gpushare-scheduler",
    "gpushare-webhook",
    "gpushare-device-plugin",
    "gpushare-webhook-certs",
)
NAMESPACES: Final = (NS, "default", "kube-system")


@pytest.mark.parametrize("account", ACCOUNTS)
def test_a_service_account_holds_exactly_what_its_part_does(
    installed: cluster.ControlPlane, account: str
) -> None:
    for namespace in NAMESPACES:
        everyone = _can_i(installed, _account("gpushare-nobody"), namespace)
        actual = _can_i(installed, _account(account), namespace)
        expected = _expected(installed, account, namespace)
        extra = rbac.beyond(actual, expected | everyone)
        assert not extra, f"{account} in {namespace} can also: {sorted(extra)}"
        missing = rbac.beyond(expected, actual)
        assert not missing, f"{account} in {namespace} cannot: {sorted(missing)}"


def test_every_service_account_of_the_manifests_is_checked() -> None:
    accounts = {o["metadata"]["name"] for o in render(MANIFESTS) if o["kind"] == "ServiceAccount"}
    assert accounts == set(ACCOUNTS)


# --- Each part, under its own ServiceAccount ---------------------------------------------------


def scheduler_config(objects: Any, *, extender: str, kubeconfig: Path) -> dict[str, Any]:
    """The manifests' KubeSchedulerConfiguration, its extender at ``extender`` (``host:port``)."""
    configmap = find(objects, "ConfigMap", "gpushare-scheduler-config")
    parsed: dict[str, Any] = yaml.safe_load(configmap["data"]["kube-scheduler-config.yaml"])
    for entry in parsed["extenders"]:
        url = urllib.parse.urlsplit(entry["urlPrefix"])
        entry["urlPrefix"] = urllib.parse.urlunsplit(url._replace(netloc=extender))
    parsed["clientConnection"] = {"kubeconfig": str(kubeconfig)}
    return parsed


def _config_file(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path


def test_kube_scheduler_and_the_extender_bind_a_pod_under_their_account(
    without_webhooks: cluster.ControlPlane, namespace: str, tmp_path: Path
) -> None:
    cp = without_webhooks
    kubeconfig = cp.service_account_kubeconfig(NS, "gpushare-scheduler")
    node = cluster.unique_name("sa-sched")
    cluster.register_gpu_node(cp, node, [cluster.gpu_card(0), cluster.gpu_card(1)], owner=namespace)
    port = cluster.free_port()
    env = {"KUBECONFIG": str(kubeconfig), names.ENV_CONFIG_FILE: str(_config_file(tmp_path))}
    with parts.run(
        "scheduler", f"--listen=127.0.0.1:{port}", log=tmp_path / "extender.log", env=env
    ) as extender:
        parts.wait_ok(f"http://127.0.0.1:{port}/readyz", extender)
        config = scheduler_config(
            render(MANIFESTS), extender=f"127.0.0.1:{port}", kubeconfig=kubeconfig
        )
        with cp.start_scheduler(config) as scheduler:
            shared = json.dumps(parts.mutated_pod("shared", namespace, 20))
            cp.kubectl("create", "-f", "-", input=shared)

            def bound() -> dict[str, Any] | None:
                extender.check_alive()
                pod = json.loads(
                    cp.kubectl("get", "pod", "shared", "-n", namespace, "-o", "json").stdout
                )
                return pod if pod["spec"].get("nodeName") else None

            try:
                pod = cluster.wait_for(bound, timeout=60, what="the pod to be bound")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{extender.log()}\n{scheduler.log(40)}") from exc
    assert pod["spec"]["nodeName"] == node
    assert pod["metadata"]["annotations"][names.ANNOTATION_CARD_UUID]
    assert "Forbidden" not in extender.log(400)


def test_the_webhook_watches_nodes_under_its_account(
    installed: cluster.ControlPlane, namespace: str, tmp_path: Path
) -> None:
    cp = installed
    kubeconfig = cp.service_account_kubeconfig(NS, "gpushare-webhook")
    cluster.register_gpu_node(
        cp, cluster.unique_name("sa-hook"), [cluster.gpu_card(0)], owner=namespace
    )
    pair = tmp_path / "pair"
    subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "certs", "--out", str(pair), "--dns", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    port, probes = cluster.free_port(), cluster.free_port()
    env = {"KUBECONFIG": str(kubeconfig), names.ENV_CONFIG_FILE: str(_config_file(tmp_path))}
    args = [
        f"--listen=127.0.0.1:{port}",
        f"--tls-cert={pair / 'tls.crt'}",
        f"--tls-key={pair / 'tls.key'}",
        f"--probe-listen=127.0.0.1:{probes}",
    ]
    with parts.run("webhook", *args, log=tmp_path / "webhook.log", env=env) as webhook:
        parts.wait_ok(f"http://127.0.0.1:{probes}/readyz", webhook)

        def knows_a_node() -> bool:
            _, text = parts.get(f"http://127.0.0.1:{probes}/metrics")
            for line in text.splitlines():
                if line.startswith("gpushare_webhook_reporting_nodes "):
                    return float(line.split()[1]) >= 1
            return False

        cluster.wait_for(knows_a_node, timeout=30, what="the webhook to read a node report")
        log = webhook.log(400)
    assert not FORBIDDEN.search(log), log


def test_the_device_plugin_reports_its_node_under_its_account(
    installed: cluster.ControlPlane, namespace: str, tmp_path: Path
) -> None:
    cp = installed
    kubeconfig = cp.service_account_kubeconfig(NS, "gpushare-device-plugin")
    node = cluster.unique_name("sa-agent")
    cluster.register_gpu_node(cp, node, [], owner=namespace, report="")
    uuid = "GPU-5a0e0000-0000-4000-8000-000000000001"
    nvml = tmp_path / "nvml.yaml"
    nvml.write_text(yaml.safe_dump({"cards": [{"uuid": uuid, "index": 0, "total": "80Gi"}]}))
    kubelet = Path(os.environ.get("TMPDIR", "/tmp")) / cluster.unique_name("kl", max_len=12)
    (kubelet / "device-plugins").mkdir(parents=True)
    (kubelet / "pod-resources").mkdir()
    port = cluster.free_port()
    settings = {"isolation": "none", "agent": {"poll_seconds": 0.2, "heartbeat_seconds": 1}}
    env = {
        "KUBECONFIG": str(kubeconfig),
        names.ENV_CONFIG_FILE: str(_config_file(tmp_path, **settings)),
    }
    args = [
        f"--kubelet-dir={kubelet}",
        f"--nvml=fake:{nvml}",
        f"--metrics-listen=127.0.0.1:{port}",
        f"--node-name={node}",
    ]
    try:
        with parts.run("device-plugin", *args, log=tmp_path / "agent.log", env=env) as agent:

            def reported() -> str | None:
                agent.check_alive()
                got = cp.kubectl("get", "node", node, "-o", "json").stdout
                text: str = json.loads(got)["metadata"]["annotations"].get(
                    names.ANNOTATION_NODE_REPORT, ""
                )
                return text if uuid in text else None

            try:
                cluster.wait_for(reported, timeout=60, what="the agent's node report")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{agent.log()}") from exc
            log = agent.log(400)
    finally:
        shutil.rmtree(kubelet, ignore_errors=True)
    assert not FORBIDDEN.search(log), log


def _installer(cp: cluster.ControlPlane, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    kubeconfig = cp.service_account_kubeconfig(NS, "gpushare-webhook-certs")
    return subprocess.run(
        [sys.executable, str(MANIFESTS / "webhook" / "install_certs.py"), "--wait-seconds=30"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )


def _secret(cp: cluster.ControlPlane) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(
        cp.kubectl("get", "secret", "gpushare-webhook-tls", "-n", NS, "-o", "json").stdout
    )
    return got


def test_the_certs_job_installs_a_pair_and_the_ca_under_its_account(
    installed: cluster.ControlPlane, tmp_path: Path
) -> None:
    cp = installed
    cp.kubectl("delete", "secret", "gpushare-webhook-tls", "-n", NS, "--ignore-not-found")
    first = _installer(cp, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    secret = _secret(cp)
    assert secret["type"] == "kubernetes.io/tls"
    ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"gpushare-webhook.{NS}.svc" in sans.get_values_for_type(x509.DNSName)
    assert cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(
        days=300
    )
    for kind in CONFIGURATIONS:
        configuration = json.loads(cp.kubectl("get", kind, "gpushare-webhook", "-o", "json").stdout)
        for hook in configuration["webhooks"]:
            assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca_pem, kind

    # Run again (the CronJob, an upgrade): a good pair is kept.
    second = _installer(cp, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _secret(cp)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
