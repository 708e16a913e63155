"""Render ``manifests/`` (and its overlays) with kustomize, as ``kubectl apply -k`` would."""

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import yaml

from tests import cluster

ROOT: Final = Path(__file__).resolve().parents[2]
MANIFESTS: Final = ROOT / "manifests"
OVERLAYS: Final = ("cert-manager", "prometheus-operator", "mixed")


class KubectlMissing(RuntimeError):
    """No kubectl to run kustomize with."""


def kubectl() -> Path:
    """The control plane's kubectl (built from the pinned Kubernetes), else one on PATH."""
    try:
        return cluster.find_binaries() / "kubectl"
    except cluster.BinariesMissingError as exc:
        found = shutil.which("kubectl")
        if found:
            return Path(found)
        raise KubectlMissing(str(exc)) from exc


@functools.cache
def render(path: Path = MANIFESTS) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize PATH`` produces, in its order."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of that kind and name."""
    for obj in objects:
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            return obj
    raise LookupError(f"no {kind} {name} in the rendered manifests")
