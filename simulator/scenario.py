"""A run: submit the trace, optionally churn, then read the fleet and compute the offline optimum.

Churn rounds model a cluster over time: a random tenth of the running services leave (at least
one), pods that were waiting are tried again (kube-scheduler retries unschedulable pods when a pod
is deleted), and as many new services arrive, drawn from the trace.

Rollouts model a Deployment's rolling update with ``maxSurge: 1, maxUnavailable: 0`` (the
default for one replica): the new pod must be placed while the old one still holds its grant, and
only then does the old one go. A surge that finds no card leaves the rollout stuck (the new pod
waits, the old keeps running); the run notes it and withdraws the new pod so the next rollout
starts from the same fleet.
"""

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gpushare.core import config, errors
from gpushare.core.quantities import format_bytes
from gpushare.simulator import optimum, planes
from gpushare.simulator.cluster import Simulation
from gpushare.simulator.fleet import Fleet, describe
from gpushare.simulator.outcome import (
    Failure,
    Outcome,
    Placement,
    Rollout,
    RolloutLanding,
    Round,
    stranded,
)
from gpushare.simulator.workload import MAX_NAME_LENGTH, Service

CHURN_SHARE: Final = 0.1
"""Share of the running services that leave in each churn round."""


@dataclass(frozen=True, slots=True)
class Options:
    """What ``gpushare simulate`` was asked."""

    seed: int = 0
    churn: int = 0
    rollouts: int = 0
    optimum_seconds: float = optimum.DEFAULT_TIME_LIMIT
    control_plane: planes.ControlPlaneName = "embedded"


Step = Callable[[str], None]
"""Told what happens, for a progress display: ``step("placing bloom")``."""


def check_fleet(
    fleet: Fleet, services: Sequence[Service], *, unit_bytes: int, overhead: int
) -> None:
    """Refuse a fleet whose largest card cannot hold even the smallest request."""
    sizes = [s.requested_bytes for s in services if s.requested_bytes is not None]
    if not sizes:
        return
    smallest = min(sizes)
    cost = -(-smallest // unit_bytes) * unit_bytes + overhead
    largest = max(fleet.cards, key=lambda card: card.model.cuda_total_bytes)
    if cost > largest.model.cuda_total_bytes:
        raise errors.ConfigError(
            f"the fleet cannot hold a single request: its largest card ({largest.model.name},"
            f" {format_bytes(largest.model.cuda_total_bytes)} usable) is smaller than the"
            f" smallest request of the trace ({format_bytes(smallest)} plus"
            f" {format_bytes(cost - smallest)} of rounding and overhead);"
            " add larger GPUs to --nodes"
        )


async def run(
    fleet: Fleet,
    services: Sequence[Service],
    options: Options,
    *,
    settings: config.Settings,
    step: Step = lambda _: None,
    advance: Callable[[int], None] = lambda _: None,
) -> Outcome:
    """Simulate ``services`` on ``fleet``; ``advance(n)`` counts submitted services."""
    began = time.perf_counter()
    async with Simulation(
        fleet,
        base=settings,
        seed=options.seed,
        progress=step,
        control_plane=options.control_plane,
    ) as sim:
        outcome = Outcome(
            fleet=fleet.spec,
            fleet_description=describe(fleet),
            policy=settings.policy,
            isolation=settings.isolation,
            seed=options.seed,
            services=len(services),
            overhead_bytes=sim.overhead_bytes,
            reserve_bytes=sim.settings.reserve_bytes,
            control_plane=sim.plane.label,
            backend=settings.backend,
        )
        try:
            results = await _drive(sim, services, options, outcome, step=step, advance=advance)
        except errors.Conflict as exc:
            raise errors.Conflict(f"{exc}\nthe parts' last log lines:\n{sim.log_tails()}") from exc
        outcome.placements = [r for r in results.values() if isinstance(r, Placement)]
        outcome.failures = [r for r in results.values() if isinstance(r, Failure)]
        outcome.cards = await sim.cards()
        outcome.api_requests = await sim.api_requests()
        outcome.extender_requests = await sim.extender_calls()
        _check_no_overcommit(sim, outcome)
        step("offline optimum")
        # The solver runs in a thread while the parts shut down.
        solving = asyncio.create_task(
            asyncio.to_thread(_optimum, fleet, outcome, sim, options.optimum_seconds)
        )
    outcome.optimum = await solving
    outcome.seconds = time.perf_counter() - began
    return outcome


async def _drive(
    sim: Simulation,
    services: Sequence[Service],
    options: Options,
    outcome: Outcome,
    *,
    step: Step,
    advance: Callable[[int], None],
) -> dict[str, Placement | Failure]:
    """Submit the trace, then run the churn rounds; the last result of every service."""
    rng = random.Random(options.seed)
    results: dict[str, Placement | Failure] = {}
    for service in services:
        step(f"placing {service.name}")
        results[service.key] = await sim.submit(service)
        advance(1)
    for number in range(1, options.churn + 1):
        step(f"churn round {number}")
        results, arrived, departed, placed_now = await _churn(sim, services, results, rng, number)
        outcome.services += arrived
        placed = [r for r in results.values() if isinstance(r, Placement)]
        failed = [r for r in results.values() if isinstance(r, Failure)]
        cards = await sim.cards()
        outcome.rounds.append(
            Round(
                number=number,
                departed=departed,
                arrived=arrived,
                placed=placed_now,
                failed=len(failed),
                running=len(placed),
                cards_used=sum(1 for c in cards if c.services),
                stranded_bytes=stranded(cards, _smallest(failed, placed, sim.overhead_bytes)),
            )
        )
        advance(1)
    running = sorted(key for key, r in results.items() if isinstance(r, Placement))
    for key in rng.sample(running, min(options.rollouts, len(running))):
        step(f"rolling out {key}")
        rollout, results = await _roll(sim, results, key)
        outcome.rollouts.append(rollout)
        advance(1)
    return results


async def _roll(
    sim: Simulation, results: dict[str, Placement | Failure], key: str
) -> tuple[Rollout, dict[str, Placement | Failure]]:
    """One rolling update of ``key`` with a surge of one: new pod first, then the old one goes."""
    old = results[key]
    assert isinstance(old, Placement)
    service = sim.submitted[key]
    suffix = "-r"
    surge = service.renamed(service.name[: MAX_NAME_LENGTH - len(suffix)] + suffix)
    before = await sim.cards()
    in_use = {card.uuid for card in before if card.services}
    placed = await sim.submit(surge)
    if isinstance(placed, Failure):
        await sim.remove(surge)
        await sim.settle()
        used = sum(1 for card in before if card.services)
        return Rollout(key, old.requested_bytes, "stuck", used, used, placed.reason), results
    peak = sum(1 for card in await sim.cards() if card.services)
    landed: RolloutLanding = (
        "same-card"
        if placed.card_uuid == old.card_uuid
        else "card-in-use"
        if placed.card_uuid in in_use
        else "empty-card"
    )
    await sim.remove(service)
    await sim.settle()
    del results[key]
    results[surge.key] = placed
    after = sum(1 for card in await sim.cards() if card.services)
    return Rollout(key, old.requested_bytes, landed, peak, after, ""), results


async def _churn(
    sim: Simulation,
    trace: Sequence[Service],
    results: dict[str, Placement | Failure],
    rng: random.Random,
    number: int,
) -> tuple[dict[str, Placement | Failure], int, int, int]:
    """Departures, retries of waiting pods, arrivals; returns how many of each, and placed."""
    running = sorted(key for key, r in results.items() if isinstance(r, Placement))
    leaving = rng.sample(running, max(1, math.ceil(CHURN_SHARE * len(running)))) if running else []
    by_key = {s.key: s for s in trace} | sim.submitted
    for key in leaving:
        await sim.remove(by_key[key])
        del results[key]
    await sim.settle()
    placed = 0
    for key, service in list(sim.pending.items()):
        results[key] = await sim.schedule(service)
        placed += isinstance(results[key], Placement)
    arrivals = [rng.choice(list(trace)) for _ in range(len(leaving))]
    for i, template in enumerate(arrivals):
        suffix = f"-c{number}-{i}"
        service = template.renamed(template.name[: MAX_NAME_LENGTH - len(suffix)] + suffix)
        results[service.key] = await sim.submit(service)
        placed += isinstance(results[service.key], Placement)
    return results, len(arrivals), len(leaving), placed


def _smallest(failed: Sequence[Failure], placed: Sequence[Placement], overhead: int) -> int | None:
    waiting = [
        f.requested_bytes
        for f in failed
        if f.requested_bytes and f.stage not in ("admission", "mutation")
    ]
    sizes = waiting or [p.requested_bytes for p in placed]
    return min(sizes) + overhead if sizes else None


def _check_no_overcommit(sim: Simulation, outcome: Outcome) -> None:
    """A card granted more than it holds is a bug of the system under test: stop loudly."""
    held = sim.kubelet_grants()
    for card in outcome.cards:
        total = held.get(card.uuid, 0) + card.overhead_bytes
        if total > card.capacity_bytes or card.granted_bytes > card.capacity_bytes:
            raise errors.Conflict(
                f"card {card.node}/{card.index} is over-committed: kubelet's IDs hold"
                f" {format_bytes(total)}, the ledger {format_bytes(card.granted_bytes)}, of"
                f" {format_bytes(card.capacity_bytes)}"
            )


def _optimum(fleet: Fleet, outcome: Outcome, sim: Simulation, seconds: float) -> optimum.Packing:
    """The cheapest cards for the services admitted (running or waiting), solved offline."""
    items = []
    results: list[Placement | Failure] = [*outcome.placements, *outcome.failures]
    for result in results:
        if isinstance(result, Failure) and result.stage in ("admission", "mutation"):
            continue
        if result.requested_bytes is None:
            continue
        units = -(-result.requested_bytes // sim.unit_bytes)
        items.append(optimum.Item(result.service, units * sim.unit_bytes + sim.overhead_bytes))
    bins = [
        optimum.Bin(
            f"{card.node}/{card.index}",
            card.model.name,
            card.model.cuda_total_bytes,
            sim.settings.card_cost(card.model.product, card.model.cuda_total_bytes),
        )
        for card in fleet.cards
    ]
    return optimum.solve(items, bins, time_limit=seconds)
