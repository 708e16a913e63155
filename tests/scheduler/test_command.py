"""The command's pieces: its listen address and the manifest that points kube-scheduler at it."""

from pathlib import Path

import yaml

from gpushare.core import names

MANIFEST = Path(__file__).resolve().parents[2] / "manifests/scheduler/kube-scheduler-config.yaml"


def test_the_manifest_sends_gpu_memory_pods_to_the_sidecar() -> None:
    config = yaml.safe_load(MANIFEST.read_text())
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert [p["schedulerName"] for p in config["profiles"]] == [names.SCHEDULER_NAME]
    (extender,) = config["extenders"]
    assert extender["urlPrefix"] == "http://127.0.0.1:8888/gpushare-scheduler"
    verbs = ("filterVerb", "prioritizeVerb", "bindVerb", "preemptVerb")
    assert [extender[verb] for verb in verbs] == ["filter", "prioritize", "bind", "preempt"]
    assert extender["nodeCacheCapable"] is True
    # Counted against node totals, so that kube-scheduler's preemption finds victims at all.
    assert extender["managedResources"] == [
        {"name": names.RESOURCE_GPU_MEMORY, "ignoredByScheduler": False}
    ]
