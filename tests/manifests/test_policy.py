"""Least privilege and resource hygiene of every object ``kubectl apply -k manifests/`` installs.

The rules live in :mod:`tests.manifests.policy`; each is run on the real manifests (no
violation) and on copies broken on purpose (the violation is named), so a rule that cannot fire
is a failing test, not a silent pass.
"""

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.manifests import policy
from tests.manifests.conftest import Objects
from tests.manifests.render import find

Breakage = Callable[[list[dict[str, Any]]], None]


@pytest.mark.parametrize("rule", sorted(policy.CHECKS))
def test_the_manifests_follow_the_rule(base: Objects, rule: str) -> None:
    assert policy.CHECKS[rule](base) == []


@pytest.mark.parametrize("rule", sorted(policy.CHECKS))
def test_the_overlays_follow_the_rule(overlay: Objects, rule: str) -> None:
    assert policy.CHECKS[rule](overlay) == []


def test_only_the_device_plugin_is_privileged(base: Objects) -> None:
    privileged = [
        c.where
        for c in policy.containers(base)
        if (c.spec.get("securityContext") or {}).get("privileged")
    ]
    assert privileged == ["DaemonSet gpushare-device-plugin, container device-plugin"]


def test_every_part_runs_under_its_own_service_account(base: Objects) -> None:
    accounts = {
        obj["metadata"]["name"]: policy.pod_spec(obj).get("serviceAccountName")  # type: ignore[union-attr]
        for obj in base
        if policy.pod_spec(obj) is not None
    }
    assert None not in accounts.values(), accounts
    parts = {k: v for k, v in accounts.items() if k in PARTS}
    assert parts == {name: name for name in PARTS}
    declared = {o["metadata"]["name"] for o in base if o["kind"] == "ServiceAccount"}
    assert set(accounts.values()) <= declared


PARTS = ("gpushare-scheduler", "gpushare-webhook", "gpushare-device-plugin")


# --- The rules catch what they should ------------------------------------------------------------


def _container(
    objects: list[dict[str, Any]], kind: str, workload: str, name: str
) -> dict[str, Any]:
    pod = policy.pod_spec(find(tuple(objects), kind, workload))
    assert pod is not None
    for container in pod["containers"]:
        if container["name"] == name:
            result: dict[str, Any] = container
            return result
    raise LookupError(name)


def _extender(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _container(objects, "Deployment", "gpushare-scheduler", "extender")


def _webhook(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _container(objects, "Deployment", "gpushare-webhook", "webhook")


def _webhook_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] | None = policy.pod_spec(
        find(tuple(objects), "Deployment", "gpushare-webhook")
    )  # type: ignore[assignment]
    assert pod is not None
    return pod


def _role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(tuple(objects), "ClusterRole", "gpushare-device-plugin")


def _wildcard_verb(objects: list[dict[str, Any]]) -> None:
    _role(objects)["rules"][0]["verbs"] = ["*"]


def _wildcard_resource(objects: list[dict[str, Any]]) -> None:
    _role(objects)["rules"][0]["resources"] = ["*"]


def _wildcard_group(objects: list[dict[str, Any]]) -> None:
    _role(objects)["rules"][0]["apiGroups"] = ["*"]


def _escalate(objects: list[dict[str, Any]]) -> None:
    _role(objects)["rules"].append(
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "verbs": ["escalate"],
        }
    )


def _cluster_secrets(objects: list[dict[str, Any]]) -> None:
    _role(objects)["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})


def _cluster_admin(objects: list[dict[str, Any]]) -> None:
    find(tuple(objects), "ClusterRoleBinding", "gpushare-device-plugin")["roleRef"]["name"] = (
        "cluster-admin"
    )


def _no_memory_limit(objects: list[dict[str, Any]]) -> None:
    del _extender(objects)["resources"]["limits"]["memory"]


def _no_cpu_request(objects: list[dict[str, Any]]) -> None:
    del _webhook(objects)["resources"]["requests"]["cpu"]


def _no_resources(objects: list[dict[str, Any]]) -> None:
    del _webhook(objects)["resources"]


def _privileged_webhook(objects: list[dict[str, Any]]) -> None:
    _webhook(objects)["securityContext"]["privileged"] = True


def _root_extender(objects: list[dict[str, Any]]) -> None:
    _extender(objects)["securityContext"]["runAsNonRoot"] = False


def _uid0_webhook(objects: list[dict[str, Any]]) -> None:
    _webhook(objects)["securityContext"]["runAsUser"] = 0


def _escalating_webhook(objects: list[dict[str, Any]]) -> None:
    del _webhook(objects)["securityContext"]["allowPrivilegeEscalation"]


def _capability(objects: list[dict[str, Any]]) -> None:
    _webhook(objects)["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]


def _host_path(objects: list[dict[str, Any]]) -> None:
    _webhook_pod(objects)["volumes"].append({"name": "host", "hostPath": {"path": "/"}})


def _host_pid(objects: list[dict[str, Any]]) -> None:
    _webhook_pod(objects)["hostPID"] = True


def _no_probe(objects: list[dict[str, Any]]) -> None:
    del _extender(objects)["readinessProbe"]


def _writable_root(objects: list[dict[str, Any]]) -> None:
    _extender(objects)["securityContext"]["readOnlyRootFilesystem"] = False


def _latest_image(objects: list[dict[str, Any]]) -> None:
    _extender(objects)["image"] = "gpushare:latest"


def _untagged_image(objects: list[dict[str, Any]]) -> None:
    _webhook(objects)["image"] = "registry.example/gpushare"


BREAKAGES: dict[str, tuple[str, Breakage, str]] = {
    "wildcard verb": ("rbac", _wildcard_verb, "wildcard in verbs"),
    "wildcard resource": ("rbac", _wildcard_resource, "wildcard in resources"),
    "wildcard api group": ("rbac", _wildcard_group, "wildcard in apiGroups"),
    "escalate verb": ("rbac", _escalate, "verb escalate"),
    "secrets of every namespace": ("rbac", _cluster_secrets, "Secrets of every namespace"),
    "cluster-admin binding": ("rbac", _cluster_admin, "broad built-in role cluster-admin"),
    "missing memory limit": ("resources", _no_memory_limit, "no memory in resources.limits"),
    "missing cpu request": ("resources", _no_cpu_request, "no cpu in resources.requests"),
    "missing resources": ("resources", _no_resources, "no memory in resources.limits"),
    "privileged webhook": ("privileges", _privileged_webhook, "privileged"),
    "extender as root": ("privileges", _root_extender, "runAsNonRoot is not true"),
    "webhook as uid 0": ("privileges", _uid0_webhook, "runs as uid 0"),
    "privilege escalation": ("privileges", _escalating_webhook, "allowPrivilegeEscalation"),
    "added capability": ("privileges", _capability, "adds capabilities"),
    "hostPath outside the device plugin": ("privileges", _host_path, "hostPath volume host"),
    "host PID outside the device plugin": ("privileges", _host_pid, "hostPID"),
    "missing readiness probe": ("probes", _no_probe, "no readinessProbe"),
    "writable root filesystem": ("read-only-root", _writable_root, "readOnlyRootFilesystem"),
    "latest image": ("images", _latest_image, "has no version"),
    "untagged image": ("images", _untagged_image, "has no version"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_manifest_is_caught(base: Objects, breakage: str) -> None:
    rule, breaking, expected = BREAKAGES[breakage]
    broken = copy.deepcopy(list(base))
    breaking(broken)
    problems = policy.CHECKS[rule](broken)
    assert problems, f"{rule} missed: {breakage}"
    assert any(expected in problem for problem in problems), problems
