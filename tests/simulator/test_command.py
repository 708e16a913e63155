"""``gpushare simulate`` as a person runs it: JSON that parses, and clear refusals of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpushare.core import names
from tests import cluster

TRACE = [
    ("chat", "20Gi"), ("search", "30Gi"), ("tiny", "4Gi"), ("agent", "12Gi"), ("eval", "40Gi"),
]


def _gpushare(*args: str, plane: str = "embedded") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("gpushare")), "simulate", "--control-plane", plane,
         *args],
        capture_output=True, text=True, timeout=240, check=False,
    )


def _write_trace(path: Path, *, memory: str | None = None) -> Path:
    documents = [
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": name, "annotations": {names.ANNOTATION_GPU_MEMORY: memory or size}
            },
            "spec": {"predictor": {"containers": [{
                "name": "kserve-container", "image": "vllm/vllm-openai:latest",
                "args": ["--model", "/mnt/models"],
                "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
            }]}},
        }
        for name, size in TRACE
    ]
    path.write_text(yaml.safe_dump_all(documents))
    return path


def test_json_output_is_machine_readable_and_churn_and_rollouts_are_reported(
    tmp_path: Path,
) -> None:
    trace = _write_trace(tmp_path / "trace.yaml")
    picture = tmp_path / "report.png"
    run = _gpushare("--nodes", "1x2xH100-80GB", "--trace", str(trace), "--churn", "2",
                    "--rollouts", "2", "--seed", "3", "--json", "--report", str(picture))
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    summary = data["summary"]
    assert summary["cards"] == 2
    departed = sum(r["departed"] for r in data["rounds"])
    assert summary["services"] == len(TRACE) + sum(r["arrived"] for r in data["rounds"])
    assert summary["running"] + summary["failed"] + departed == summary["services"]
    assert [r["number"] for r in data["rounds"]] == [1, 2]
    assert summary["optimum"]["status"] == "optimal"
    assert summary["cards_used"] >= summary["optimum"]["cards_used"]
    assert data["extender_requests"]["filter"] >= len(TRACE)
    # Each rollout placed its new pod while the old one ran, or got stuck; a service stays one.
    assert len(data["rollouts"]) == summary["rollouts"] == 2
    for rollout in data["rollouts"]:
        assert rollout["landed"] in ("same-card", "card-in-use", "empty-card", "stuck")
        assert rollout["cards_at_peak"] >= rollout["cards_after"]
    used = sum(card["cost"] for card in data["cards"] if card["services"])
    assert summary["cost_used"] == pytest.approx(used, abs=1e-3)  # rounded to thousandths
    for card in data["cards"]:
        assert card["granted_bytes"] <= card["capacity_bytes"]
    assert picture.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nodes", "4x8xH900-80GB"], "unknown GPU model 'H900-80GB'"),
        (["--nodes", "1x1xT4-16GB", "--trace", "{big}"], "the fleet cannot hold a single request"),
        (["--trace", "{broken}"], "is not YAML"),
        (["--trace", "{missing}"], "no such file or folder"),
        (["--report", "{nofolder}"], "no such folder"),
    ],
    ids=["unknown-gpu", "fleet-too-small", "trace-not-yaml", "trace-missing", "report-folder"],
)
def test_bad_input_exits_non_zero_with_a_message_and_no_traceback(
    tmp_path: Path, args: list[str], says: str
) -> None:
    big = _write_trace(tmp_path / "big.yaml", memory="40Gi")
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: [serving")
    paths = {"big": str(big), "broken": str(broken), "missing": str(tmp_path / "nope"),
             "nofolder": str(tmp_path / "no" / "r.png")}
    run = _gpushare(*(arg.format(**paths) for arg in args))
    assert run.returncode == 2
    assert says in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


@pytest.mark.cluster
def test_the_real_control_plane_runs_the_same_trace_and_the_report_says_so(
    tmp_path: Path,
) -> None:
    trace = _write_trace(tmp_path / "trace.yaml")
    run = _gpushare("--nodes", "1x2xH100-80GB", "--trace", str(trace), "--churn", "1", "--json",
                    plane="real")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["control_plane"].startswith("kube-apiserver and kube-scheduler (v1.")
    assert data["summary"]["running"] == len(TRACE)
    # kube-scheduler itself called the extender and posted nothing: the extender bound each pod.
    assert data["extender_requests"]["bind"] == data["api_requests"]["POST pods/binding"]
    for card in data["cards"]:
        assert card["granted_bytes"] <= card["capacity_bytes"]


def test_auto_is_embedded_where_no_control_plane_is_built(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "trace.yaml")
    env = {k: v for k, v in os.environ.items() if k != names.ENV_CONTROLPLANE_BIN}
    env[names.ENV_CONTROLPLANE_CACHE] = str(tmp_path / "empty")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("gpushare")), "simulate", "--nodes", "1x2xH100-80GB",
         "--trace", str(trace), "--json"],
        capture_output=True, text=True, timeout=240, check=False, env=env,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["control_plane"].startswith("embedded API server")


@pytest.mark.cluster
def test_auto_is_real_where_the_control_plane_is_built(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "trace.yaml")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("gpushare")), "simulate", "--nodes", "1x2xH100-80GB",
         "--trace", str(trace), "--json"],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, names.ENV_CONTROLPLANE_BIN: str(cluster.find_binaries())},
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["control_plane"].startswith("kube-apiserver and kube-scheduler")


def test_real_where_no_control_plane_is_built_is_refused_saying_how_to_build_it(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != names.ENV_CONTROLPLANE_BIN}
    env[names.ENV_CONTROLPLANE_CACHE] = str(tmp_path / "empty")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("gpushare")), "simulate", "--control-plane", "real"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )
    assert run.returncode == 2
    assert "control plane not built: run tests/controlplane/build.sh" in run.stderr
    assert "Traceback" not in run.stderr
