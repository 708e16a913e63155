"""One order for the Kubernetes connection in every part: ``--kubeconfig``, ``$KUBECONFIG``, the
pod's service account, ``~/.kube/config``; a failing source is named in the error."""

import argparse
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from gpushare.core import errors
from gpushare.deviceplugin import main as plugin
from gpushare.runtime import connection
from gpushare.scheduler import main as scheduler
from gpushare.webhook import main as webhook


def kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig with one context whose cluster is ``server`` (token credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "secret"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        })
    )  # fmt: skip
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KUBECONFIG, not in a pod, and a home of our own."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


async def test_the_flag_wins_over_the_environment_and_the_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_environment: Path
) -> None:
    flag = kubeconfig(tmp_path / "flag", "https://flag.example:6443")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "env", "https://env.example")))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    kubeconfig(clean_environment / ".kube" / "config", "https://home.example")
    assert (await connection.configuration(flag)).host == "https://flag.example:6443"


async def test_kubeconfig_in_the_environment_wins_over_the_pods_account_and_the_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_environment: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "env", "https://env.example")))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    kubeconfig(clean_environment / ".kube" / "config", "https://home.example")
    assert (await connection.configuration()).host == "https://env.example"


async def test_several_files_in_kubeconfig_are_merged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = kubeconfig(tmp_path / "first", "https://first.example")
    missing = tmp_path / "missing"
    monkeypatch.setenv("KUBECONFIG", f"{missing}:{first}")
    assert (await connection.configuration()).host == "https://first.example"


async def test_inside_a_pod_the_service_account_comes_before_the_home(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    kubeconfig(clean_environment / ".kube" / "config", "https://home.example")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    # This machine is no pod: the account's token file is missing, and the error says so rather
    # than quietly using the home's kubeconfig.
    with pytest.raises(errors.ConfigError, match="the pod's service account"):
        await connection.configuration()


async def test_outside_a_pod_the_home_kubeconfig_is_used(clean_environment: Path) -> None:
    kubeconfig(clean_environment / ".kube" / "config", "https://home.example")
    assert (await connection.configuration()).host == "https://home.example"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("kind: Config\nclusters: [", "cannot use kubeconfig"),
        ("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n", "cannot use kubeconfig"),
    ],
)
async def test_an_unusable_flag_file_is_named_in_the_error(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "broken"
    if content is not None:
        path.write_text(content)
    with pytest.raises(errors.ConfigError, match=expected) as caught:
        await connection.configuration(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "part", [plugin, scheduler, webhook], ids=["plugin", "scheduler", "webhook"]
)
def test_every_part_documents_the_same_order(part: ModuleType) -> None:
    parser = argparse.ArgumentParser()
    part.add_arguments(parser)
    [flag] = [a for a in parser._actions if "--kubeconfig" in a.option_strings]
    assert flag.help == connection.FLAG_HELP
