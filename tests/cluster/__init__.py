"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-scheduler, kubectl.

The binaries are built from Kubernetes' own Go source by ``tests/controlplane/build.sh`` into a
cache folder named by version; :func:`find_binaries` locates it. :class:`ControlPlane` (the
product's :mod:`gpushare.simulator.controlplane`, which ``gpushare simulate`` runs too) starts etcd
and kube-apiserver on loopback with free ports, as controller-runtime's envtest does:

- TLS with a throwaway CA that signs both the serving certificate and the client certificates
  (``--client-ca-file``); an admin client certificate in group ``system:masters`` and a kubeconfig
  (:attr:`ControlPlane.kubeconfig`) that uses it;
- ``--authorization-mode=Node,RBAC``, so ServiceAccounts get exactly what their RBAC grants;
- a service-account signing key (``--service-account-key-file``, ``-signing-key-file``,
  ``-issuer``), so the TokenRequest API works (:meth:`ControlPlane.create_token`);
- the default admission plugins, including ``ServiceAccount`` and ``TaintNodesByCondition``.

No kube-controller-manager runs, so what its controllers would do is done here by hand:
:func:`create_namespace` also creates the ``default`` ServiceAccount (the ServiceAccount
admission plugin refuses pods without it), :func:`register_gpu_node` removes the ``not-ready`` taint
that ``TaintNodesByCondition`` puts on every new Node, and namespaces never finish terminating
(tests keep apart by namespace and by node owner label; :func:`cleanup_namespace` force-deletes what
a test left). No kubelet runs either: pods that kube-scheduler binds stay ``Pending`` on their node.

Two ways to talk to the apiserver from Python: :meth:`ControlPlane.rest` (plain dicts in and out,
:class:`ApiError` on failure; what the helpers here use) and :meth:`ControlPlane.api_client` (the
official, pydantic-typed ``kubernetes`` client).

The package by concern: :mod:`.plane` (the control plane and its clients), :mod:`.objects`
(namespaces, GPU nodes); processes, certificates and the REST client are the product's.
"""

from gpushare.simulator.controlplane.binaries import BinariesMissingError
from gpushare.simulator.controlplane.launch import (
    ControlPlaneError,
    Process,
    answers,
    free_port,
    tail,
    wait_for,
)
from gpushare.simulator.controlplane.rest import ApiError, Rest
from gpushare.simulator.controlplane.server import (
    KUBECONFIG_PLACEHOLDER,
    SERVICE_CLUSTER_IP_RANGE,
    Scheduler,
)
from tests.cluster.objects import (
    LABEL_OWNER,
    Target,
    cleanup_namespace,
    create_namespace,
    gpu_card,
    node_report,
    register_gpu_node,
    set_node_report,
    unique_name,
)
from tests.cluster.plane import ControlPlane, KubectlError, find_binaries, pinned_versions

__all__ = [
    "KUBECONFIG_PLACEHOLDER",
    "LABEL_OWNER",
    "SERVICE_CLUSTER_IP_RANGE",
    "ApiError",
    "BinariesMissingError",
    "ControlPlane",
    "ControlPlaneError",
    "KubectlError",
    "Process",
    "Rest",
    "Scheduler",
    "Target",
    "answers",
    "cleanup_namespace",
    "create_namespace",
    "find_binaries",
    "free_port",
    "gpu_card",
    "node_report",
    "pinned_versions",
    "register_gpu_node",
    "set_node_report",
    "tail",
    "unique_name",
    "wait_for",
]
