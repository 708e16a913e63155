"""Fixtures of the manifest tests: the rendered base and overlays."""

import os
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import render

Objects = tuple[dict[str, Any], ...]


def _render(path: Path) -> Objects:
    try:
        return render.render(path)
    except render.KubectlMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no kubectl to render manifests with: {exc}", pytrace=False)
        pytest.skip(f"no kubectl to render manifests with: {exc}")


@pytest.fixture(scope="session")
def base() -> Objects:
    """``kubectl kustomize manifests/``: what ``kubectl apply -k manifests/`` installs."""
    return _render(render.MANIFESTS)


@pytest.fixture(scope="session", params=render.OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Objects:
    """Each overlay under ``manifests/overlays/``, rendered."""
    return _render(render.MANIFESTS / "overlays" / request.param)


@pytest.fixture(scope="session")
def prometheus_operator() -> Objects:
    """``manifests/overlays/prometheus-operator``, rendered."""
    return _render(render.MANIFESTS / "overlays" / "prometheus-operator")


@pytest.fixture(scope="session")
def cert_manager() -> Objects:
    """``manifests/overlays/cert-manager``, rendered."""
    return _render(render.MANIFESTS / "overlays" / "cert-manager")
