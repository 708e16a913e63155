"""Every built-in object validates against the Kubernetes schema of the tested release.

The apiserver checks everything again, custom resources included, in test_apiserver.py; this
runs without it, in a second.
"""

from typing import Any

import kubernetes_validate
import pytest

from tests import cluster
from tests.manifests.conftest import Objects

CUSTOM_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")


def _schema_version() -> str:
    kubernetes, _ = cluster.pinned_versions()
    major, minor = kubernetes.removeprefix("v").split(".")[:2]
    wanted = f"{major}.{minor}.0"
    known = kubernetes_validate.utils.all_versions()
    return wanted if wanted in known else kubernetes_validate.latest_version()


def _validate(objects: Objects) -> list[str]:
    version = _schema_version()
    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {exc.message}")
    return problems


def test_the_base_objects_are_valid(base: Objects) -> None:
    assert _validate(base) == []


def test_the_overlay_objects_are_valid(overlay: Objects) -> None:
    assert _validate(overlay) == []


def test_the_validator_catches_a_misspelt_field(base: Objects) -> None:
    broken: list[dict[str, Any]] = [
        {**obj, "spec": {**obj["spec"], "replica": 3}}
        for obj in base
        if obj["kind"] == "Deployment"
    ]
    assert broken
    problems = _validate(tuple(broken))
    if not problems:
        pytest.fail("strict validation let an unknown field through")
