"""``gpushare simulate`` as a person runs it: wall time and figures of a few fleets and policies.

    python benchmarks/simulate_default.py            # the defaults, then spread, then a mixed fleet
    python benchmarks/simulate_default.py --runs 3   # each case three times (wall time: min/max)

Each case is the installed command in a fresh process (``gpushare simulate --json``), so the wall
time includes the Python start, the parts' start, the 60 services and the offline optimum: what
the README promises to finish in under a minute. Prints, per case: wall time, the run's own time,
GPUs used with sharing, the one-model-per-GPU baseline, the offline optimum and its status, the
ratio, services placed, stranded memory, and how many services landed on the extender's card.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = {
    "default (4x8xH100-80GB, binpack)": [],
    "spread": ["--policy", "spread"],
    "mixed fleet": ["--nodes", "2x8xH100-80GB,2x8xL4-24GB,1x4xH200-141GB"],
    "churn 5": ["--churn", "5"],
}


def _run(args: list[str]) -> tuple[float, dict[str, Any]]:
    command = [str(Path(sys.executable).with_name("gpushare")), "simulate", "--json", *args]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return wall, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per case (default 1)")
    args = parser.parse_args()
    print(f"{'case':34} {'wall s':>13} {'run s':>6} {'GPUs':>5} {'base':>5} {'opt':>10}"
          f" {'ratio':>6} {'placed':>7} {'stranded GiB':>13} {'steered':>8}")
    for name, extra in CASES.items():
        walls: list[float] = []
        data: dict[str, Any] = {}
        for _ in range(args.runs):
            wall, data = _run(extra)
            walls.append(wall)
        s = data["summary"]
        opt = s["optimum"]
        wall_text = f"{min(walls):.1f}" + (f"-{max(walls):.1f}" if len(walls) > 1 else "")
        print(
            f"{name:34} {wall_text:>13} {data['seconds']:>6.1f} {s['cards_used']:>5}"
            f" {s['baseline_cards']:>5} {str(opt['cards_used']) + ' ' + opt['status']:>10}"
            f" {s['ratio_to_optimum']:>6.2f} {s['running']:>3}/{s['running'] + s['failed']:<3}"
            f" {s['stranded_bytes'] / 2**30:>13.1f} {s['on_extenders_card']:>8}"
        )


if __name__ == "__main__":
    main()
