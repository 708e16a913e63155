"""``gpushare simulate`` as a person runs it: the old and the new default policy, case by case.

    python benchmarks/simulate_default.py            # every case, binpack and fill side by side
    python benchmarks/simulate_default.py --runs 3   # each case three times (wall time: min/max)
    python benchmarks/simulate_default.py --seed 2   # another arrival order (and churn, rollouts)
    python benchmarks/simulate_default.py --control-plane embedded   # without kube-scheduler

Each case is the installed command in a fresh process (``gpushare simulate --json``), so the wall
time includes the Python start, the parts' start, the services and the offline optimum. Cases: the
defaults (4 x 8 H100, the built-in trace), a mixed fleet (16 H100 + 16 L4 + 4 H200), five rounds of
churn on each fleet, ten rolling updates (maxSurge 1) on a fleet just large enough for the trace
(5 x 4 H100), and spread for reference. Each runs under ``binpack`` (the old default) and ``fill``
(the new one). Printed per run: wall time, GPUs used and the optimum's, their cost (a card weighs
its usable memory in GiB unless the configuration says otherwise) and the optimum's, the ratios to
the optimum in cost and in GPUs (none when the two place different numbers of services), services
placed, stranded memory, and for the rollouts how many got stuck or opened an empty card. The
first line says which control plane scheduled the pods: the real kube-apiserver and kube-scheduler
where ``tests/controlplane/build.sh`` has built them (``gpushare simulate``'s ``auto``), else the
embedded API server with one simulated kube-scheduler cycle per pod.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIXED = "2x8xH100-80GB,2x8xL4-24GB,1x4xH200-141GB"
CASES = {
    "default (4x8xH100-80GB)": [],
    "mixed fleet (16 H100, 16 L4, 4 H200)": ["--nodes", MIXED],
    "churn 5": ["--churn", "5"],
    "mixed fleet, churn 5": ["--nodes", MIXED, "--churn", "5"],
    "10 rollouts, full fleet (5x4xH100)": ["--nodes", "5x4xH100-80GB", "--rollouts", "10"],
}
POLICIES = ("binpack", "fill")
"""The old default and the new one."""
REFERENCE = {"spread": ["--policy", "spread"]}


def _run(args: list[str]) -> tuple[float, dict[str, Any]]:
    command = [str(Path(sys.executable).with_name("gpushare")), "simulate", "--json", *args]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return wall, json.loads(done.stdout)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _row(name: str, policy: str, walls: list[float], data: dict[str, Any]) -> str:
    s = data["summary"]
    opt = s["optimum"] or {}
    wall_text = f"{min(walls):.1f}" + (f"-{max(walls):.1f}" if len(walls) > 1 else "")
    rollouts = (
        f"{s['rollouts_stuck']} stuck, {s['rollouts_on_empty_cards']} opened a card"
        if s["rollouts"]
        else ""
    )
    note = "" if s["comparison"] == "same services placed" else f"  ({s['comparison']})"
    return (
        f"{name:38} {policy:8} {wall_text:>9} {s['cards_used']:>5} {opt.get('cards_used')!s:>5}"
        f" {s['cost_used']:>8.0f} {opt.get('cost') or 0:>8.0f} {opt.get('status', '?'):>8}"
        f" {_ratio(s['ratio_to_optimum']):>6} {_ratio(s['card_ratio_to_optimum']):>6}"
        f" {s['running']:>3}/{s['running'] + s['failed']:<3}"
        f" {s['stranded_bytes'] / 2**30:>9.1f}  {rollouts}{note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per case (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="gpushare simulate --seed (default 0)")
    parser.add_argument(
        "--control-plane", default="auto", help="gpushare simulate --control-plane (default auto)"
    )
    args = parser.parse_args()
    print(
        f"{'case':38} {'policy':8} {'wall s':>9} {'GPUs':>5} {'opt':>5} {'cost':>8} {'opt':>8}"
        f" {'solver':>8} {'xcost':>6} {'xGPUs':>6} {'placed':>7} {'stranded GiB':>9}  rollouts"
    )
    runs = [
        (name, policy, [*extra, "--policy", policy])
        for name, extra in CASES.items()
        for policy in POLICIES
    ] + [(f"{name} (reference)", name, extra) for name, extra in REFERENCE.items()]
    said = False
    for name, policy, extra in runs:
        walls: list[float] = []
        data: dict[str, Any] = {}
        for _ in range(args.runs):
            wall, data = _run(
                [*extra, "--seed", str(args.seed), "--control-plane", args.control_plane]
            )
            walls.append(wall)
        if not said:
            print(f"scheduled by: {data.get('control_plane', '?')}", flush=True)
            said = True
        print(_row(name, policy, walls, data), flush=True)


if __name__ == "__main__":
    main()
