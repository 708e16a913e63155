"""``gpushare simulate``: the whole system on one machine, as a capacity planner.

    gpushare simulate [--nodes 4x8xH100-80GB,...] [--trace FILE|DIR] [--policy fill|binpack|spread]
                      [--churn N] [--rollouts N] [--backend extender|dra] [--seed N] [--json]
                      [--report report.png]

It starts the real webhook, extender and one device plugin per simulated node on loopback, drives
them as kube-apiserver, kube-scheduler and kubelet do for every InferenceService of the trace, and
prints where each landed, how many GPUs that takes against one model per GPU and against the
offline optimum, and what did not fit and why. ``--backend dra`` runs the trace through
kube-scheduler's DRA allocator (the real control plane, with kube-controller-manager's ResourceClaim
controller; the plugins publish ResourceSlices and prepare claims), then through the extender, and
prints both backends' cards used beside the optimum.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gpushare.core import config, errors, placement
from gpushare.simulator import fleet, optimum, planes, processes

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``gpushare simulate``."""
    parser.add_argument(
        "--nodes", default=fleet.DEFAULT_SPEC, metavar="SPEC",
        help=f"the fleet: <nodes>x<cards>x<model>, comma-separated (default {fleet.DEFAULT_SPEC});"
        f" models: {', '.join(m.name for m in fleet.CATALOGUE.values())}",
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE|DIR",
        help="InferenceService YAMLs carrying the gpushare.io/gpu-memory annotation"
        " (default: a built-in trace of 60 vLLM services from 0.5B to 72B parameters)",
    )
    parser.add_argument(
        "--policy", choices=placement.POLICIES, help="placement (default: configured, fill)"
    )
    parser.add_argument(
        "--isolation", choices=["mps", "mps-shared", "none"],
        help="isolation the device plugins run (default: configured, mps)",
    )
    parser.add_argument(
        "--churn", type=_non_negative, default=0, metavar="N",
        help="rounds of random departures and arrivals after the trace (default 0)",
    )
    parser.add_argument(
        "--rollouts", type=_non_negative, default=0, metavar="N",
        help="rolling updates (maxSurge 1) of N running services, one after another, at the end"
        " (default 0)",
    )
    parser.add_argument(
        "--control-plane", choices=planes.CONTROL_PLANES, default="auto",
        help="embedded: an in-process API server, the simulation plays one kube-scheduler cycle"
        " per pod; real: kube-apiserver and kube-scheduler built by tests/controlplane/build.sh;"
        " auto (default): real where those are built, else embedded",
    )
    parser.add_argument(
        "--backend", choices=["extender", "dra"], default=None,
        help="who places the pods (default: configured, extender); dra runs the trace through"
        " kube-scheduler's DRA allocator on the real control plane, then through the extender,"
        " and prints both",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="arrival order and churn (default 0)")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON only")
    parser.add_argument("--report", type=Path, metavar="FILE.png", help="draw every card to a PNG")
    parser.add_argument(
        "--optimum-seconds", type=float, default=optimum.DEFAULT_TIME_LIMIT, metavar="S",
        help=f"time limit of the offline optimum's solver (default {optimum.DEFAULT_TIME_LIMIT:g})",
    )


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Simulate, then print the table (or JSON) and draw the picture."""
    # The parts' fork server imports them while this process reads its input.
    processes.warm_up()
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from gpushare.simulator import report, scenario, trace, workload  # noqa: PLC0415

    settings = config.load(
        overrides={"policy": args.policy, "isolation": args.isolation, "backend": args.backend}
    )
    the_fleet = fleet.parse(args.nodes)
    if args.trace is not None:
        services = workload.load(args.trace)
    else:
        services = trace.builtin(
            reserve_bytes=settings.reserve_bytes, unit_bytes=settings.unit_bytes, seed=args.seed
        )
    scenario.check_fleet(
        the_fleet, services, unit_bytes=settings.unit_bytes,
        overhead=settings.allocation_overhead_bytes,
    )
    if args.report is not None and not args.report.parent.resolve().is_dir():
        raise errors.BadRequest(f"--report {args.report}: no such folder {args.report.parent}")
    options = scenario.Options(
        seed=args.seed, churn=args.churn, rollouts=args.rollouts,
        optimum_seconds=args.optimum_seconds, control_plane=args.control_plane,
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]simulate[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, transient=True,
        disable=not console.is_terminal,
    ) as progress:
        backends = ["dra", "extender"] if settings.backend == "dra" else [settings.backend]
        per_run = len(services) + args.churn + args.rollouts
        task = progress.add_task("starting", total=per_run * len(backends))
        outcomes = [
            asyncio.run(
                scenario.run(
                    the_fleet, services, options,
                    settings=settings.model_copy(update={"backend": backend}),
                    step=lambda what: progress.update(task, description=what),
                    advance=lambda n: progress.advance(task, n),
                )
            )
            for backend in backends
        ]  # fmt: skip
    outcome = outcomes[0]
    if len(outcomes) > 1:
        outcome.backends = {
            o.backend: {"cards_used": o.cards_used, "placed": len(o.placements)} for o in outcomes
        }
    if args.report is not None:
        from gpushare.simulator import picture  # noqa: PLC0415 - matplotlib only when drawing

        picture.draw(outcome, args.report)
    if args.json:
        json.dump(outcome.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        report.print_report(outcome, Console())
        if args.report is not None:
            Console().print(f"picture: {args.report}")
    return 0
