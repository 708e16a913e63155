"""The `node` tests' cluster (tests/node/local.py), once per session; tests keep apart by
namespace. Where the machine lacks what it needs (root, containerd, runc, buildah, mmdebstrap, the
kubelet build) the tests are skipped with the reason, and fail under CI."""

import os
from collections.abc import Iterator

import pytest

from tests import cluster
from tests.node import kserve, local, runtime


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.RealNode]:
    """The control plane, kube-controller-manager, containerd, kubelet and gpushare's parts."""
    try:
        with local.start(tmp_path_factory.mktemp("node")) as node:
            yield node
    except (cluster.BinariesMissingError, runtime.NodeUnavailableError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI installs and builds what the node tests need)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def kserve_manager(
    real_node: local.RealNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[cluster.Process]:
    """KServe's controller manager on the node's cluster (tests/node/kserve.py)."""
    folder = tmp_path_factory.mktemp("kserve")
    try:
        with kserve.start(
            real_node.cp, real_node.containerd, real_node.images["vllm-standin"], folder
        ) as manager:
            yield manager
    except runtime.NodeUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI builds KServe's manager)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def node_namespace(real_node: local.RealNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace of the node's cluster; deleted (with what it holds) afterwards."""
    name = cluster.unique_name(f"n-{request.node.name}", max_len=40)
    cluster.create_namespace(real_node.cp, name)
    yield name
    real_node.cp.kubectl("delete", "namespace", name, "--timeout=120s", check=False, timeout=150)
