"""The queries of the generated dashboards, as Grafana would send them with "All" selected."""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dashboards import generate

BUILTINS: Final = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
"""Grafana's own variables, at values that suit a test Prometheus scraping every second."""


@dataclass(frozen=True)
class Query:
    """One target of one panel."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def dashboards() -> dict[str, dict[str, Any]]:
    """Every committed dashboard JSON by uid."""
    result = {}
    for path in sorted(generate.GRAFANA.glob("*.json")):
        board: dict[str, Any] = json.loads(Path(path).read_text())
        result[board["uid"]] = board
    return result


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves excluded)."""
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def queries(board: dict[str, Any]) -> Iterator[Query]:
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield Query(
                board["uid"], panel["title"], target.get("refId", ""), target.get("expr", "")
            )


def expand(expr: str, board: dict[str, Any], overrides: dict[str, str] | None = None) -> str:
    """The expression with every variable at its "All" value (or ``overrides``)."""
    values = dict(BUILTINS)
    for name, variable in variables(board).items():
        values[name] = variable.get("allValue") or ".*"
    values.update(overrides or {})

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)
