"""Render the dashboards and the PrometheusRule to the files committed under ``manifests/``."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as models

from dashboards import cards, inferenceservices, overview, scheduler, webhook
from gpushare.core import names

ROOT: Final = Path(__file__).resolve().parent.parent
MANIFESTS: Final = ROOT / "manifests"
GRAFANA: Final = MANIFESTS / "grafana"
ALERTS: Final = MANIFESTS / "monitoring" / "alerts.yaml"
PROMETHEUS_RULE: Final = MANIFESTS / "overlays" / "prometheus-operator" / "prometheusrule.yaml"

BUILDERS: Final[dict[str, Callable[[], models.Dashboard]]] = {
    overview.UID: overview.build,
    cards.UID: cards.build,
    inferenceservices.UID: inferenceservices.build,
    scheduler.UID: scheduler.build,
    webhook.UID: webhook.build,
}
"""Every dashboard by uid; its file is ``manifests/grafana/<uid>.json``."""

RULE_HEADER: Final = (
    "# Generated from manifests/monitoring/alerts.yaml by `python -m dashboards`: edit that file.\n"
)


def dashboard_json(uid: str) -> str:
    """One dashboard as the JSON text Grafana imports (keys sorted, so diffs stay small)."""
    return json.dumps(BUILDERS[uid](), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def prometheus_rule(alerts_text: str) -> str:
    """The PrometheusRule (monitoring.coreos.com/v1) carrying the plain rules file's groups."""
    rules: Any = yaml.safe_load(alerts_text)
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "gpushare", "namespace": names.NAMESPACE},
        "spec": {"groups": rules["groups"]},
    }
    return RULE_HEADER + yaml.safe_dump(rule, sort_keys=False, width=100)


def rendered() -> dict[Path, str]:
    """Every generated file and the text it must hold."""
    files = {GRAFANA / f"{uid}.json": dashboard_json(uid) for uid in BUILDERS}
    files[PROMETHEUS_RULE] = prometheus_rule(ALERTS.read_text())
    return files


def stale() -> list[Path]:
    """Generated files that are missing or differ from what the code produces."""
    return [
        path for path, text in rendered().items() if not path.exists() or path.read_text() != text
    ]


def write() -> list[Path]:
    """Write every generated file; return those that changed."""
    changed = stale()
    for path, text in rendered().items():
        if path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return changed
