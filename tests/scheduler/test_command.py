"""The command's pieces: its listen address and the manifest that points kube-scheduler at it."""

from pathlib import Path

import pytest
import yaml

from gpushare import errors, names
from gpushare.scheduler.service import parse_listen

MANIFEST = Path(__file__).resolve().parents[2] / "manifests/scheduler/kube-scheduler-config.yaml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8888", ("0.0.0.0", 8888)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8888", ("::1", 8888)),
        (":8888", ("0.0.0.0", 8888)),
    ],
    ids=["all-ipv4", "any-port", "ipv6", "no-host"],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8888", "host:", "host:http", "host:70000"])
def test_a_bad_listen_address_is_a_configuration_error(text: str) -> None:
    with pytest.raises(errors.ConfigError, match="is not HOST:PORT"):
        parse_listen(text)


def test_the_manifest_sends_gpu_memory_pods_to_the_sidecar() -> None:
    config = yaml.safe_load(MANIFEST.read_text())
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert [p["schedulerName"] for p in config["profiles"]] == [names.SCHEDULER_NAME]
    (extender,) = config["extenders"]
    assert extender["urlPrefix"] == "http://127.0.0.1:8888/gpushare-scheduler"
    assert (extender["filterVerb"], extender["prioritizeVerb"], extender["bindVerb"]) == (
        "filter",
        "prioritize",
        "bind",
    )
    assert extender["nodeCacheCapable"] is True
    assert extender["managedResources"] == [
        {"name": names.RESOURCE_GPU_MEMORY, "ignoredByScheduler": True}
    ]
