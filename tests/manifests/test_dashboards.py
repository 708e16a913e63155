"""The Grafana dashboards: generated from code, committed current, shipped in labelled ConfigMaps.

Whether every query returns data from the real exporters is in test_prometheus.py; here each
query must at least be valid PromQL (promtool parses it) with every variable defined.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import generate
from tests.manifests import panels
from tests.manifests.conftest import Objects


def test_the_committed_files_are_what_the_code_generates() -> None:
    stale = [str(path.relative_to(generate.ROOT)) for path in generate.stale()]
    assert stale == [], "out of date: run `python -m dashboards` and commit the result"


def test_every_dashboard_ships_in_a_configmap_for_grafanas_sidecar(base: Objects) -> None:
    shipped = {}
    for obj in base:
        if (
            obj["kind"] == "ConfigMap"
            and obj["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        ):
            assert obj["metadata"]["namespace"] == "gpushare-system"
            for key, text in obj["data"].items():
                shipped[key] = text
    files = {path.name: path.read_text() for path in generate.GRAFANA.glob("*.json")}
    assert shipped == files
    assert len(files) == len(generate.BUILDERS)


def test_each_configmap_stays_far_below_the_client_side_apply_limit(base: Objects) -> None:
    # `kubectl apply` (client side) copies an object into an annotation limited to 256 KiB.
    for obj in base:
        if obj["kind"] == "ConfigMap":
            assert len(json.dumps(obj)) < 128 * 1024, obj["metadata"]["name"]


def test_the_dashboards_cover_cluster_cards_inferenceservices_scheduler_and_webhook() -> None:
    boards = panels.dashboards()
    assert set(boards) == {
        "gpushare-overview",
        "gpushare-cards",
        "gpushare-inferenceservices",
        "gpushare-scheduler",
        "gpushare-webhook",
    }
    isvc = " ".join(q.expr for q in panels.queries(boards["gpushare-inferenceservices"]))
    for metric in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
    ):
        assert metric in isvc
    names = {name for board in boards.values() for name in panels.variables(board)}
    assert {"datasource", "node", "namespace"} <= names
    titles = {p["title"] for p in panels.panels(boards["gpushare-overview"])}
    assert "GPUs saved" in titles


@pytest.mark.parametrize("uid", sorted(generate.BUILDERS))
def test_a_dashboard_is_well_formed(uid: str) -> None:
    board = panels.dashboards()[uid]
    assert board["title"].startswith("gpushare / ")
    assert "gpushare" in board["tags"]
    variables = panels.variables(board)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for row in board["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels.panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), panel["title"]
    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", name
            panels.expand(variable["query"], board)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = []
    for board in panels.dashboards().values():
        for query in panels.queries(board):
            rules.append({"record": "gpushare:check", "expr": panels.expand(query.expr, board)})
        for variable in panels.variables(board).values():
            query_text = variable.get("query", "")
            if variable["type"] == "query" and query_text.startswith("label_values("):
                selector = query_text.removeprefix("label_values(").rsplit(",", 1)[0]
                rules.append({"record": "gpushare:check", "expr": panels.expand(selector, board)})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", "--lint=none", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
