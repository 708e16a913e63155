"""gpushare's Grafana dashboards as code, and the generated files they become.

``python -m dashboards`` writes every dashboard's JSON under ``manifests/grafana/`` and the
Prometheus operator's PrometheusRule (from the plain rules in ``manifests/monitoring/``);
``python -m dashboards --check`` fails when a committed file is not what the code produces.
"""
