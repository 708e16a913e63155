"""Escapes from isolation (``benchmarks/isolation_escapes.py``) against the product's own Allocate.

- Everywhere: the whole run on stand-ins (CUDA and MPS as the dry run stands them in, a stand-in
  NVML fed by the children), so the orchestration and the agent's reaction are proven on a CPU.
- Marked ``gpu``: the real run (real NVML, real MPS daemons started by the agent, torch in each
  container process). Every escape is either held to the 10 GiB grant or caught: an Event naming
  the container and an eviction within the agent's poll interval plus one second of the process's
  first allocation; the cooperative container is held and never reported. Needs root, the MPS
  binaries and torch; skipped elsewhere, saying which is missing.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "isolation_escapes.py"
GRANT_MIB = 10 * 1024
ESCAPES = ("raise-limit", "drop-pipe", "empty-pipe", "own-daemon", "unseen-gpu", "unknown-uuid")


def run_escapes(out: Path, *args: str, timeout: float) -> Any:
    """Run the benchmark's one command; return its JSON."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    path = out / "isolation-escapes.json"
    assert path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    return json.loads(path.read_text())


def check(data: Any, *, poll: float) -> None:
    rows = {(r["mode"], r["escape"]): r for r in data["rows"]}
    assert set(rows) == {(m, e) for m in ("mps", "mps-shared") for e in ("cooperative", *ESCAPES)}
    for key, row in rows.items():
        assert "error" not in row, (key, row["error"])
        assert row["verdict"] in ("held", "caught"), (key, row)
        if row["verdict"] == "caught":
            assert row["evicted_after_s"] <= poll + 1.0, (key, row)
            assert "container main" in row["event"] and "GpuIsolationEscape" in row["event"]
        else:
            assert row["allocated_mib"] <= GRANT_MIB and row["event_after_s"] is None, (key, row)
    for mode in ("mps", "mps-shared"):
        assert rows[(mode, "cooperative")]["verdict"] == "held"
    # A daemon per container holds a raised limit variable (measured before on driver 580).
    assert rows[("mps", "raise-limit")]["verdict"] == "held"


def test_every_escape_is_held_or_caught_on_stand_ins(tmp_path: Path) -> None:
    data = run_escapes(tmp_path, "--dry-run", "--poll", "0.5", timeout=240)
    check(data, poll=0.5)
    # The stand-ins escape every way but the daemon's default: each is caught, not held.
    caught = {(r["mode"], r["escape"]) for r in data["rows"] if r["verdict"] == "caught"}
    assert caught == {(m, e) for m in ("mps", "mps-shared") for e in ESCAPES} - {
        ("mps", "raise-limit")
    }


@pytest.mark.gpu
def test_every_escape_is_held_or_caught_on_a_real_gpu(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("MPS control daemons need root")
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as exc:  # no library, no driver, no card
        pytest.skip(f"no NVIDIA GPU here: {exc}")
    data = run_escapes(tmp_path, "--poll", "1.0", timeout=360)
    check(data, poll=1.0)
