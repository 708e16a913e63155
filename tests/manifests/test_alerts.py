"""The alert rules: valid for promtool, unit-tested with promtool, and the same in both forms."""

import os
import shutil
import subprocess
from typing import Any, Final

import pytest
import yaml

from dashboards import generate
from tests.manifests.conftest import Objects
from tests.manifests.render import find

ALERTS_TEST: Final = generate.ALERTS.parent / "alerts-test.yaml"
REQUIRED: Final = {
    "GpushareAgentHeartbeatLost",
    "GpushareContainerOverGrant",
    "GpushareCardOvercommitted",
    "GpushareExtenderErrors",
    "GpushareWebhookDenialsSpiking",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, check=False)


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(generate.ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    result = _run("check", "rules", str(generate.ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_pass_their_unit_tests() -> None:
    result = _run("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_in_which_it_fires() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _rules()} <= firing


def test_the_alerts_cover_heartbeat_overuse_overcommit_extender_and_webhook() -> None:
    names = {rule["alert"] for rule in _rules()}
    assert names >= REQUIRED
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_prometheus_rule_carries_exactly_the_plain_rules() -> None:
    rule = yaml.safe_load(generate.PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(generate.ALERTS.read_text())["groups"]


def test_the_prometheus_operator_overlay_installs_the_rule(prometheus_operator: Objects) -> None:
    overlay = prometheus_operator
    rule = find(overlay, "PrometheusRule", "gpushare")
    assert rule["metadata"]["namespace"] == "gpushare-system"
    monitors = {
        (o["kind"], o["metadata"]["name"]) for o in overlay if o["kind"].endswith("Monitor")
    }
    assert monitors == {
        ("PodMonitor", "gpushare-device-plugin"),
        ("PodMonitor", "gpushare-vllm"),
        ("ServiceMonitor", "gpushare-scheduler"),
        ("ServiceMonitor", "gpushare-webhook"),
    }
    device_plugin = find(overlay, "PodMonitor", "gpushare-device-plugin")
    assert device_plugin["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
