"""The real control plane of a simulation is configured as an admin's cluster is."""

from pathlib import Path

import yaml

from gpushare.simulator import planes

MANIFEST = (
    Path(__file__).resolve().parents[2] / "manifests" / "scheduler" / "kube-scheduler-config.yaml"
)


def test_the_simulations_kube_scheduler_runs_the_manifests_profile_and_extender() -> None:
    shipped = yaml.safe_load(MANIFEST.read_text())
    ours = planes.scheduler_configuration("http://127.0.0.1:1/prefix", Path("/kubeconfig"))
    assert ours["profiles"] == shipped["profiles"]
    (extender,) = ours["extenders"]
    (expected,) = shipped["extenders"]
    assert extender.pop("urlPrefix") == "http://127.0.0.1:1/prefix"
    expected.pop("urlPrefix")
    assert extender == expected
