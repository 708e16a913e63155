"""``manifests/overlays/mixed``: both backends in one cluster, chosen per namespace and per node by
the ``gpushare.io/backend`` label, rendered as ``kubectl apply -k`` would."""

import pytest

from gpushare.core import config, errors, names
from gpushare.webhook import paths
from tests.manifests.conftest import Objects, _render
from tests.manifests.render import MANIFESTS, find


@pytest.fixture(scope="module")
def rendered() -> Objects:
    return _render(MANIFESTS / "overlays" / "mixed")


def _selected(hook: dict[str, object]) -> list[tuple[str, str, tuple[str, ...]]]:
    selector = hook["namespaceSelector"]
    assert isinstance(selector, dict)
    return [
        (e["key"], e["operator"], tuple(e["values"]))
        for e in selector["matchExpressions"]
        if e["key"] == names.LABEL_BACKEND
    ]


def test_each_namespace_reaches_exactly_one_mutation(rendered: Objects) -> None:
    extender, dra = find(rendered, "MutatingWebhookConfiguration", "gpushare-webhook")["webhooks"]
    assert extender["clientConfig"]["service"]["path"] == f"/{paths.MUTATE_PODS}"
    assert dra["clientConfig"]["service"]["path"] == f"/{paths.MUTATE_PODS_DRA}"
    assert _selected(extender) == [(names.LABEL_BACKEND, "NotIn", ("dra",))]
    assert _selected(dra) == [(names.LABEL_BACKEND, "In", ("dra",))]
    # Everything else about the two entries is the same: system namespaces, rules, policies.
    same = {k: v for k, v in extender.items() if k not in ("name", "namespaceSelector")}
    assert {k: v for k, v in dra.items() if k not in ("name", "namespaceSelector")} == {
        **same,
        "clientConfig": dra["clientConfig"],
    }
    assert dra["sideEffects"] == "NoneOnDryRun"  # it creates claim templates, never on dry runs


def test_the_extender_and_the_dra_parts_are_both_installed(rendered: Objects) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert ("Deployment", "gpushare-scheduler") in kinds
    assert ("DeviceClass", names.DRA_DEVICE_CLASS) in kinds
    assert ("ClusterRole", "gpushare-device-plugin-dra") in kinds
    assert ("ClusterRole", "gpushare-webhook-dra") in kinds


def test_nodes_choose_their_backend_by_label_not_by_the_daemonsets_environment(
    rendered: Objects,
) -> None:
    daemonset = find(rendered, "DaemonSet", "gpushare-device-plugin")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert "GPUSHARE_BACKEND" not in {e["name"] for e in container["env"]}
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins", "/var/run/cdi"} <= (
        mounted
    )


def test_a_label_chooses_the_backend_and_a_wrong_one_says_what_to_write() -> None:
    assert config.backend_for({}, "extender") == "extender"
    assert config.backend_for({names.LABEL_BACKEND: "dra"}, "extender") == "dra"
    assert config.backend_for({names.LABEL_BACKEND: "extender"}, "dra") == "extender"
    with pytest.raises(errors.ConfigError, match="write extender or dra"):
        config.backend_for({names.LABEL_BACKEND: "DRA"}, "extender")
