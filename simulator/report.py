"""The readable end of a run: tables of cards, figures and failures, printed with rich."""

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gpushare.core.quantities import GI, format_bytes
from gpushare.simulator.outcome import CardState, Outcome

BAR_WIDTH = 12
"""Characters of the per-card fill bar."""
MAX_NAMES = 4
"""Service names shown per card before ``(+N)``."""
MAX_REASON = 240
"""A failure reason lists every node's; a large fleet's would fill the screen."""


def render(outcome: Outcome) -> RenderableType:
    """Everything, in reading order."""
    parts: list[RenderableType] = [_header(outcome), _cards(outcome), _summary(outcome)]
    if outcome.rounds:
        parts.append(_rounds(outcome))
    if outcome.rollouts:
        parts.append(_rollouts(outcome))
    if outcome.failures:
        parts.append(_failures(outcome))
    return Group(*parts)


def print_report(outcome: Outcome, console: Console) -> None:
    """Print the report on ``console``."""
    console.print(render(outcome))


def _header(outcome: Outcome) -> Text:
    text = Text()
    text.append("gpushare simulate", style="bold")
    text.append(f"  {outcome.fleet_description}\n")
    text.append(
        f"policy {outcome.policy} · isolation {outcome.isolation} · seed {outcome.seed} ·"
        f" {outcome.services} InferenceServices: {len(outcome.placements)} running,"
        f" {len(outcome.failures)} not · {outcome.seconds:.1f} s"
    )
    if outcome.control_plane:
        backend = "" if outcome.backend == "extender" else f" · backend {outcome.backend}"
        text.append(f"\nscheduled by: {outcome.control_plane}{backend}", style="dim")
    if outcome.backends:
        optimum = outcome.optimum.cards_used if outcome.optimum is not None else None
        each = ", ".join(
            f"{name} {row['cards_used']} ({row['placed']} placed)"
            for name, row in outcome.backends.items()
        )
        text.append(f"\ncards used on this trace: {each}; optimum {optimum}", style="bold")
    return text


def _bar(card: CardState) -> Text:
    filled = round(BAR_WIDTH * min(card.granted_bytes, card.capacity_bytes) / card.capacity_bytes)
    used = round(BAR_WIDTH * min(card.used_bytes, card.capacity_bytes) / card.capacity_bytes)
    used = min(used, filled)
    bar = Text()
    bar.append("█" * used, style="green")
    bar.append("█" * (filled - used), style="dark_green")
    bar.append("·" * (BAR_WIDTH - filled), style="dim")
    return bar


def _cards(outcome: Outcome) -> Table:
    table = Table(title="Cards", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("card", no_wrap=True)
    table.add_column("InferenceServices", ratio=1)
    table.add_column("granted / usable", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("in use", justify="right", no_wrap=True)
    table.add_column("free", justify="right", no_wrap=True)
    idle = [card for card in outcome.cards if not card.services]
    for card in outcome.cards:
        if not card.services:
            continue
        names = [name.split("/", 1)[-1] for name in card.services]
        shown = ", ".join(names[:MAX_NAMES]) + (
            f" (+{len(names) - MAX_NAMES})" if len(names) > MAX_NAMES else ""
        )
        table.add_row(
            f"{card.node} #{card.index}",
            shown,
            f"{_gib(card.granted_bytes)} / {_gib(card.capacity_bytes)} GiB",
            _bar(card),
            format_bytes(card.used_bytes),
            format_bytes(card.room_bytes),
        )
    if idle:
        table.add_row(f"{len(idle)} idle card{'s' if len(idle) > 1 else ''}", style="dim")
    return table


def _gib(n: int) -> str:
    return f"{n / GI:.1f}"


def _summary(outcome: Outcome) -> Table:
    table = Table(
        title="Summary",
        box=box.SIMPLE_HEAD,
        show_header=False,
        title_justify="left",
        pad_edge=False,
    )
    table.add_column("figure")
    table.add_column("value")
    table.add_row("GPUs used, sharing", f"[bold]{outcome.cards_used}[/] of {len(outcome.cards)}")
    fleet_note = (
        f" (more than the fleet's {len(outcome.cards)})"
        if outcome.baseline > len(outcome.cards)
        else ""
    )
    table.add_row("GPUs used, one model per GPU", f"{outcome.baseline}{fleet_note}")
    if outcome.optimum is not None:
        opt = outcome.optimum
        placed = (
            f", places {opt.placed} of {len(outcome.placements)}"
            if opt.placed != len(outcome.placements)
            else ""
        )
        table.add_row(
            "GPUs used, offline optimum",
            f"{opt.cards_used if opt.cards_used is not None else '?'}"
            f" (CP-SAT {opt.status}, lower bound {opt.cards_bound}, {opt.seconds:.1f} s{placed})",
        )
    table.add_row("cost of the GPUs used", f"{outcome.cost_used:,.1f}")
    if outcome.optimum is not None and outcome.optimum.cost is not None:
        table.add_row(
            "cost, offline optimum",
            f"{outcome.optimum.cost:,.1f} (lower bound {outcome.optimum.cost_bound:,.1f})",
        )
    if outcome.ratio is not None and outcome.card_ratio is not None:
        table.add_row(
            "online / optimum", f"{outcome.ratio:.2f} in cost, {outcome.card_ratio:.2f} in GPUs"
        )
    elif outcome.optimum is not None:
        table.add_row("online / optimum", outcome.comparison)
    if outcome.cards_used:
        table.add_row(
            "InferenceServices per used GPU", f"{len(outcome.placements) / outcome.cards_used:.2f}"
        )
    table.add_row(
        "memory granted",
        f"{format_bytes(outcome.granted_bytes)} of {format_bytes(outcome.capacity_bytes)} usable",
    )
    table.add_row("memory in use (vLLM)", format_bytes(outcome.used_bytes))
    steered = sum(p.steered for p in outcome.placements)
    table.add_row(
        "on the extender's card", f"{steered} of {len(outcome.placements)} (device IDs as steered)"
    )
    smallest = outcome.smallest_waiting_bytes
    stranded_cards = sum(
        1
        for card in outcome.cards
        if smallest and 0 < card.room_bytes < smallest + outcome.overhead_bytes
    )
    waiting = any(f.stage not in ("admission", "mutation") for f in outcome.failures)
    what = "the smallest waiting request" if waiting else "the smallest request"
    table.add_row(
        "stranded memory",
        f"{format_bytes(outcome.stranded_bytes)} on {stranded_cards}"
        f" card{'' if stranded_cards == 1 else 's'}"
        + (f" (free room under {what}, {format_bytes(smallest)})" if smallest else ""),
    )
    return table


def _rounds(outcome: Outcome) -> Table:
    table = Table(title="Churn", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for column in (
        "round",
        "departed",
        "arrived",
        "placed",
        "not running",
        "running",
        "GPUs used",
        "stranded",
    ):
        table.add_column(column, justify="right")
    for r in outcome.rounds:
        table.add_row(
            str(r.number),
            str(r.departed),
            str(r.arrived),
            str(r.placed),
            str(r.failed),
            str(r.running),
            str(r.cards_used),
            format_bytes(r.stranded_bytes),
        )
    return table


def _rollouts(outcome: Outcome) -> Table:
    table = Table(
        title="Rollouts (maxSurge 1)", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
    )
    for column in ("InferenceService", "request", "new pod", "GPUs at peak", "GPUs after"):
        table.add_column(
            column, justify="left" if column in ("InferenceService", "new pod") else "right"
        )
    for r in outcome.rollouts:
        table.add_row(
            r.service.split("/", 1)[-1],
            format_bytes(r.requested_bytes),
            "stuck: no card has room for a second copy" if r.landed == "stuck" else r.landed,
            str(r.cards_at_peak),
            str(r.cards_after),
        )
    return table


def _failures(outcome: Outcome) -> Table:
    table = Table(title="Not running", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("InferenceService")
    table.add_column("request", justify="right")
    table.add_column("stopped at")
    table.add_column("reason", overflow="fold")
    for failure in outcome.failures:
        table.add_row(
            failure.service.split("/", 1)[-1],
            format_bytes(failure.requested_bytes) if failure.requested_bytes else "?",
            failure.stage,
            _short(failure.reason),
        )
    return table


def _short(reason: str) -> str:
    """A reason cut to :data:`MAX_REASON` characters at a clause (``--json`` keeps it whole)."""
    if len(reason) <= MAX_REASON:
        return reason
    cut = reason.rfind(", ", 0, MAX_REASON)
    return reason[: cut if cut > 0 else MAX_REASON] + ", …"
