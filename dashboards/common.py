"""What every gpushare dashboard shares: the data source, the template variables, panel shapes.

Each dashboard module builds one :class:`Board`; panels are added in reading order and laid out
left to right, top to bottom (24 columns wide, as Grafana's grid is).
"""

import string
from typing import Final

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

DATASOURCE_VARIABLE: Final = "datasource"
DATASOURCE: Final = models.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")
"""Every panel and variable queries the Prometheus chosen in the ``datasource`` variable."""

ALL: Final = ".*"
"""The value of a multi-value variable's "All": queries match with ``=~"$var"``."""

TAGS: Final = ["gpushare"]
RATE: Final = "$__rate_interval"
"""Window of every ``rate()``: Grafana makes it at least four scrape intervals."""

PanelBuilder = timeseries.Panel | stat.Panel | table.Panel


def datasource_variable() -> dashboard.DatasourceVariable:
    """The Prometheus data source every panel uses."""
    return dashboard.DatasourceVariable(DATASOURCE_VARIABLE).label("Data source").type("prometheus")


def label_variable(
    name: str, label: str, query: str, *, regex: str = ""
) -> dashboard.QueryVariable:
    """A multi-value variable over a label's values (``label_values(...)``), "All" by default."""
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .multi(True)
        .include_all(True)
        .all_value(ALL)
        .current(models.VariableOption(selected=True, text="All", value="$__all"))
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
    )
    if regex:
        variable = variable.regex(regex)
    return variable


def query(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    """A PromQL query; ``legend`` is Grafana's legend format (``{{node}} GPU {{gpu_index}}``)."""
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    if instant:
        target = target.instant().format(prometheus_models.PromQueryFormat.TABLE)
    return target


class Board:
    """A dashboard under construction: numbers panels and their queries as they are added."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self._builder = (
            dashboard.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(TAGS)
            .readonly()
            .time("now-6h", "now")
            .refresh("30s")
            .timezone("browser")
            .tooltip(models.DashboardCursorSync.CROSSHAIR)
            .with_variable(datasource_variable())
        )
        self._next_id = 1

    def variable(self, variable: dashboard.QueryVariable) -> "Board":
        self._builder = self._builder.with_variable(variable)
        return self

    def row(self, title: str) -> "Board":
        self._builder = self._builder.with_row(dashboard.Row(title).id(self._take_id()))
        return self

    def timeseries(
        self,
        title: str,
        description: str,
        *targets: prometheus.Dataquery,
        unit: str = "short",
        width: int = 12,
        height: int = 8,
        stacked: bool = False,
        minimum: float | None = 0,
    ) -> "Board":
        """A graph over time; ``stacked`` for parts of a whole (memory by pod)."""
        panel = (
            timeseries.Panel()
            .unit(unit)
            .line_width(1)
            .fill_opacity(20 if stacked else 10)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common_models.LegendDisplayMode.TABLE)
                .placement(common_models.LegendPlacement.BOTTOM)
                .show_legend(True)
                .calcs(["lastNotNull", "max"])
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common_models.TooltipDisplayMode.MULTI)
                .sort(common_models.SortOrder.DESCENDING)
            )
        )
        if stacked:
            panel = panel.stacking(
                common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL)
            )
        if minimum is not None:
            panel = panel.min(minimum)
        return self._add(panel, title, description, targets, width=width, height=height)

    def stat(
        self,
        title: str,
        description: str,
        *targets: prometheus.Dataquery,
        unit: str = "short",
        width: int = 4,
        height: int = 4,
    ) -> "Board":
        """One number (the last value), with a sparkline."""
        panel = (
            stat.Panel()
            .unit(unit)
            .graph_mode(common_models.BigValueGraphMode.AREA)
            .color_mode(common_models.BigValueColorMode.VALUE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        )
        return self._add(panel, title, description, targets, width=width, height=height)

    def table(
        self,
        title: str,
        description: str,
        *targets: prometheus.Dataquery,
        columns: tuple[str, ...] = (),
        unit: str = "short",
        column_units: dict[str, str] | None = None,
        width: int = 24,
        height: int = 8,
    ) -> "Board":
        """Instant queries joined on their labels into one row per series.

        ``columns`` names the value of each query in turn (Grafana calls them ``Value #A``...);
        ``column_units`` gives some of them a unit other than ``unit``.
        """
        renames = {
            f"Value #{ref_id}": column
            for ref_id, column in zip(string.ascii_uppercase, columns, strict=False)
        }
        panel = (
            table.Panel()
            .unit(unit)
            .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(
                models.DataTransformerConfig(
                    id_val="organize",
                    options={"excludeByName": {"Time": True}, "renameByName": renames},
                )
            )
        )
        for column, column_unit in (column_units or {}).items():
            panel = panel.override_by_name(
                column, [models.DynamicConfigValue(id_val="unit", value=column_unit)]
            )
        return self._add(panel, title, description, targets, width=width, height=height)

    def build(self) -> models.Dashboard:
        return self._builder.build()

    def _add(
        self,
        panel: PanelBuilder,
        title: str,
        description: str,
        targets: tuple[prometheus.Dataquery, ...],
        *,
        width: int,
        height: int,
    ) -> "Board":
        panel = panel.id(self._take_id()).title(title).description(description)
        panel = panel.datasource(DATASOURCE).span(width).height(height)
        if len(targets) > len(string.ascii_uppercase):
            raise ValueError(f"{title}: at most {len(string.ascii_uppercase)} queries a panel")
        for ref_id, target in zip(string.ascii_uppercase, targets, strict=False):
            panel = panel.with_target(target.ref_id(ref_id))
        self._builder = self._builder.with_panel(panel)
        return self

    def _take_id(self) -> int:
        panel_id = self._next_id
        self._next_id += 1
        return panel_id
