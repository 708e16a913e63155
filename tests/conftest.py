"""Shared pytest fixtures of gpushare's tests."""

# ===== control plane (tests/cluster.py) ===========================================================
# A real etcd + kube-apiserver, started once per session by `control_plane`; tests keep apart by
# namespace (`namespace`). Tests that use them are marked `cluster` (added automatically to any test
# whose fixtures include `control_plane`). Without the binaries (tests/controlplane/build.sh) such
# tests are skipped, except under CI (`CI` set) where they fail. A failing cluster test's report
# carries the tails of the control-plane logs.
# Tests on a real kubelet and containerd (tests/node) are marked `node` the same way (by their
# fixture `real_node`), skipped outside CI and failed under CI where the machine lacks them.

import os
from collections.abc import Generator, Iterator

import pytest
from hypothesis import settings

from tests import cluster

# The machine may be busy (a Go build, a control plane, other suites): judge properties, not speed.
# Inherit the active profile (a --hypothesis-profile given on the command line) and lift only the
# deadline.
settings.register_profile("gpushare", parent=settings.default, deadline=None)
settings.load_profile("gpushare")

_CONTROL_PLANE_KEY = pytest.StashKey[cluster.ControlPlane]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "control_plane" in fixtures:
            item.add_marker(pytest.mark.cluster)
        if "real_node" in fixtures:
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[cluster.ControlPlane]:
    """One etcd + kube-apiserver (TLS, RBAC, admin kubeconfig) for the whole session."""
    try:
        bin_dir = cluster.find_binaries()
    except cluster.BinariesMissingError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI must build the control plane before pytest)", pytrace=False)
        pytest.skip(str(exc))
    with cluster.ControlPlane(bin_dir) as cp:
        request.config.stash[_CONTROL_PLANE_KEY] = cp
        yield cp
        del request.config.stash[_CONTROL_PLANE_KEY]


@pytest.fixture
def namespace(control_plane: cluster.ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its ``default`` ServiceAccount) for this test.

    Afterwards its pods are force-deleted, Nodes registered with ``owner=<namespace>`` are deleted,
    and the namespace is deleted without waiting.
    """
    name = cluster.unique_name(f"t-{request.node.name}", max_len=40)
    cluster.create_namespace(control_plane, name)
    yield name
    cluster.cleanup_namespace(control_plane, name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "control_plane" in getattr(item, "fixturenames", ()):
        cp = item.config.stash.get(_CONTROL_PLANE_KEY, None)
        if cp is not None:
            for name, text in cp.logs().items():
                if text:
                    report.sections.append((f"control plane: {name}", text))
    return report


# ===== end of control plane =======================================================================
