"""The GPU proof (``benchmarks/gpu_proof.py``): four services packed on one card by the real parts.

- Everywhere: the whole run on stand-ins (fake NVML, the stand-in MPS control program, the vLLM
  stand-in of ``fakevllm/``), so the orchestration itself is proven on a CPU.
- Marked ``gpu``: the stand-in server on the real card (real NVML, real MPS daemons, its budget held
  with torch); and real vLLM (needs it importable through ``SERVER_PYTHONPATH`` and a model folder
  from ``make_model.py`` in ``GPUSHARE_PROOF_MODEL``, default ``/tmp/model``). Skipped elsewhere,
  saying what is missing. Both need root (MPS control daemons).
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import config

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_proof.py"
GI = 1 << 30
MI = 1 << 20


def run_proof(out: Path, *args: str, timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run the benchmark's one command; return its JSON."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    path = out / "gpu-proof.json"
    assert path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(path.read_text())
    phases = json.dumps(data.get("phases"), indent=1)
    assert done.returncode == 0, phases[-3000:] + done.stderr[-2000:]
    return data


def check_packing(data: Any, phase: str, *, tokens: int, real_memory: bool) -> None:
    """What the proof must show for one MPS phase."""
    entry = data["phases"][phase]
    assert "error" not in entry, entry["error"]
    assert entry["ready"] == ["llm-10g", "llm-16g", "llm-20g", "llm-24g"]
    assert all(c["ok"] for c in entry["completions"].values()), entry["completions"]
    for record in entry["submitted"]:
        util = record["allocate_env"]["GPUSHARE_VLLM_GPU_MEMORY_UTILIZATION"]
        flags = [w for w in record["argv"] if w.startswith("--gpu-memory-utilization")]
        assert flags == [f"--gpu-memory-utilization={util}"], record["argv"]
        assert record["bind_annotations"]["gpushare.io/granted-bytes"] == str(
            int(record["annotation"].removesuffix("Gi")) * GI
        )
    figures = entry["figures"]["ready"]
    reserve_mib = config.Settings().reserve_bytes / MI
    for row in figures["instances"]:
        assert row["utilization_vllm"] is not None
        assert float(row["utilization_vllm"]) == float(row["utilization_env"]), row
        assert row["outside_grant_mib"] < 0, f"{row['name']} uses more than its grant: {row}"
        if real_memory:
            assert 0 < row["outside_budget_mib"] <= reserve_mib, row
    card = figures["card"]
    assert card["sum_grants_gib"] == 70.0
    assert card["used_gib"] <= card["cuda_total_gib"]
    for row in entry["watchdog"]["containers"]:
        assert row["attributed"], row
        assert row["exporter_used_mib"] == pytest.approx(row["nvml_used_mib"], rel=0.01)
        if "exporter_vs_smi_percent" in row:
            assert abs(row["exporter_vs_smi_percent"]) <= 1.0, row
    if "card_used_diff_percent_of_total" in entry["watchdog"]:
        assert abs(entry["watchdog"]["card_used_diff_percent_of_total"]) <= 1.0
    for key in ("latency_idle", "latency_busy"):
        assert entry[key]["tokens_seen"] == [tokens], entry[key]
        assert entry[key]["ttft"]["p50_ms"] > 0
    assert not entry["latency_busy"]["load"]["errors"]


def check_refusals(data: Any) -> None:
    entry = data["phases"]["mps"]
    extender = entry["refused_by_extender"]
    assert extender["refused_by"] == "extender", extender
    assert "no card with 16.1 GiB free" in extender["reason"]
    greedy = entry["refused_by_vllm"]
    assert greedy["refused"], greedy
    assert "Free memory on device" in greedy["message"]
    undisturbed = entry["undisturbed"]
    assert undisturbed["completions_ok"] and undisturbed["alive"], undisturbed
    assert undisturbed["used_gib_after"] == undisturbed["used_gib_before"]


def test_the_proof_runs_through_stand_ins_on_a_cpu(tmp_path: Path) -> None:
    data = run_proof(
        tmp_path,
        "--dry-run",
        "--phases",
        "mps",
        "--requests",
        "2",
        "--tokens",
        "4",
        "--busy-streams",
        "1",
        timeout=240,
    )
    check_packing(data, "mps", tokens=4, real_memory=False)
    check_refusals(data)
    assert (tmp_path / "gpu-proof.png").stat().st_size > 0


def _gpu_or_skip() -> None:
    try:
        import pynvml  # noqa: PLC0415 - only GPU machines need it
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA GPU here: {exc}")
    if count != 1:
        pytest.skip(f"the proof packs one card; this machine has {count}")
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("MPS control daemons need root")


def _vllm_or_skip() -> tuple[str, str]:
    """A GPU, vLLM importable through ``SERVER_PYTHONPATH`` and a model: those two, or skip."""
    _gpu_or_skip()
    site = os.environ.get("SERVER_PYTHONPATH", "")
    probe = subprocess.run(
        [sys.executable, "-c", "import vllm"],
        env={**os.environ, "PYTHONPATH": site},
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("vLLM is not importable: set SERVER_PYTHONPATH to the folder that holds it")
    model = os.environ.get("GPUSHARE_PROOF_MODEL", "/tmp/model")
    if not (Path(model) / "config.json").exists():
        pytest.skip(f"no model in {model}: run make_model.py (set GPUSHARE_PROOF_MODEL)")
    return site, model


@pytest.mark.gpu
def test_the_stand_in_proof_holds_on_a_real_card(tmp_path: Path) -> None:
    _gpu_or_skip()
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        pytest.skip("torch is not installed (the stand-in holds its budget with it)")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    data = run_proof(
        tmp_path,
        "--fake-server",
        "--phases",
        "mps,mps-shared",
        "--requests",
        "3",
        "--tokens",
        "16",
        "--busy-streams",
        "2",
        timeout=600,
    )
    for phase in ("mps", "mps-shared"):
        check_packing(data, phase, tokens=16, real_memory=False)
    check_refusals(data)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpushare_packs_four_vllm_servers_onto_one_card(tmp_path: Path) -> None:
    site, model = _vllm_or_skip()
    data = run_proof(
        tmp_path,
        "--phases",
        "mps",
        "--model",
        model,
        "--requests",
        "5",
        "--tokens",
        "32",
        timeout=840,
        env={"SERVER_PYTHONPATH": site},
    )
    check_packing(data, "mps", tokens=32, real_memory=True)
    check_refusals(data)


def check_concurrent(data: Any) -> None:
    """Every concurrent start under MPS: no start failed, each KV cache within 1% of the
    sequential start's (vllm#55827 mis-sizes instances that profile memory together)."""
    starts = data["summary"]["concurrent_starts"]
    assert starts, data["summary"]
    for start in starts:
        assert start["failed"] == [], start
        assert len(start["num_gpu_blocks"]) == 4, start
        assert start["largest_difference_percent"] is not None, start
        assert start["largest_difference_percent"] <= 1.0, start
        assert start["all_ready_seconds"] is not None, start


def test_concurrent_starts_run_through_stand_ins_on_a_cpu(tmp_path: Path) -> None:
    data = run_proof(
        tmp_path, "--dry-run", "--phases", "mps,concurrent-1,concurrent-shared-1",
        "--requests", "2", "--tokens", "4", "--busy-streams", "1", timeout=240,
    )  # fmt: skip
    check_concurrent(data)
    isolations = {
        p: data["phases"][p]["isolation"] for p in ("concurrent-1", "concurrent-shared-1")
    }
    assert isolations == {"concurrent-1": "mps", "concurrent-shared-1": "mps-shared"}


def check_throughput(data: Any, phase: str) -> None:
    """A throughput figure per server beside idle and busy neighbours, windows as asked."""
    measured = data["phases"][phase]["throughput"]
    servers = data["phases"][phase]["ready"]
    assert measured["target_alone"]["name"] == data["options"]["target"]
    assert measured["target_alone"]["tokens_per_second"] > 0
    together = measured["together"]
    assert together["servers"] == servers
    assert together["windows"] == data["options"]["repeats"]
    assert not together["errors"], together["errors"]
    for row in together["per_server"].values():
        low, high = row["spread"]
        assert 0 < low <= row["tokens_per_second"] <= high
    assert set(measured["share_of_alone_percent"]) == set(servers)
    summary = data["summary"]["throughput"][phase]
    assert summary["share_of_alone_percent"] == measured["share_of_alone_percent"]


def test_the_sequential_reference_and_throughput_run_through_stand_ins_on_a_cpu(
    tmp_path: Path,
) -> None:
    data = run_proof(
        tmp_path, "--dry-run", "--phases", "sequential,concurrent-1", "--repeats", "2",
        "--requests", "2", "--tokens", "4", "--busy-streams", "1", "--throughput-seconds", "1",
        timeout=240,
    )  # fmt: skip
    check_concurrent(data)
    start = data["summary"]["concurrent_starts"][0]
    sequential = data["phases"]["sequential"]
    assert sequential["start"] == "sequential"
    assert start["sequential_all_ready_seconds"] == sequential["all_ready_seconds"]
    assert set(start["sequential_num_gpu_blocks"].values()) != {None}, start
    check_throughput(data, "sequential")
    check_throughput(data, "concurrent-1")


def check_share(data: Any, *, tokens: int) -> None:
    """The share phase: the neighbour restarted with a compute share that reached its daemon."""
    entry = data["phases"]["share"]
    assert "error" not in entry, entry["error"]
    capped = entry["capped_start"]["submitted"][0]
    assert capped["gpushare.io/compute-share"] == "30"
    assert entry["capped_env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    for key in ("latency_idle", "latency_busy_uncapped", "latency_busy_capped"):
        measured = entry[key]
        assert measured["tokens_seen"] == [tokens], measured
        assert len(measured["repeats"]) == data["options"]["repeats"]
        low, high = measured["spread"]["ttft_p50_ms"]
        assert 0 < low <= high
    for key in ("latency_busy_uncapped", "latency_busy_capped"):
        assert not entry[key]["load"]["errors"]
    summary = data["summary"]["latency"]
    assert summary["mps, one busy neighbour, compute share"]["repeats"] == 2


def test_the_compute_share_phase_runs_through_stand_ins_on_a_cpu(tmp_path: Path) -> None:
    data = run_proof(
        tmp_path, "--dry-run", "--phases", "share", "--repeats", "2", "--requests", "2",
        "--tokens", "4", "--busy-streams", "1", timeout=240,
    )  # fmt: skip
    check_share(data, tokens=4)
    with tarfile.open(tmp_path / "logs.tar.gz") as archive:
        logs = archive.getnames()
    assert any(name.startswith("share/") for name in logs), logs


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_a_compute_share_caps_a_busy_neighbour_on_a_real_card(tmp_path: Path) -> None:
    site, model = _vllm_or_skip()
    data = run_proof(
        tmp_path, "--phases", "share", "--model", model, "--requests", "10",
        "--tokens", "64", "--deadline", "480", timeout=840, env={"SERVER_PYTHONPATH": site},
    )  # fmt: skip
    check_share(data, tokens=64)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_four_vllm_servers_started_at_once_size_their_caches_as_if_alone(tmp_path: Path) -> None:
    site, model = _vllm_or_skip()
    data = run_proof(
        tmp_path, "--phases", "concurrent-1,concurrent-shared-1,mps", "--model", model,
        "--requests", "3", "--tokens", "16", "--deadline", "420",
        timeout=840, env={"SERVER_PYTHONPATH": site},
    )  # fmt: skip
    check_concurrent(data)
