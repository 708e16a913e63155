"""``gpushare device-plugin`` as a process: flags, registration, exporter, node report, SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from gpushare.core import names, nodereport
from tests import cluster
from tests.deviceplugin.kubelet import TestKubelet


async def test_the_command_serves_reports_and_stops_cleanly(
    control_plane: cluster.ControlPlane,
    namespace: str,
    kubelet: TestKubelet,
    nvml_file: Path,
    short_tmp: Path,
) -> None:
    node = cluster.unique_name("cli-node", max_len=30)
    cluster.register_gpu_node(control_plane, node, [cluster.gpu_card(0)], owner=namespace)
    port = cluster.free_port()
    config = short_tmp / "gpushare.yaml"
    config.write_text(f"agent:\n  mps_root: {short_tmp / 'mps'}\n  poll_seconds: 0.1\n")
    env = {**os.environ, names.ENV_CONFIG_FILE: str(config), "NODE_NAME": node}
    argv = [
        sys.executable,
        "-m",
        "gpushare.cli",
        "device-plugin",
        "--kubelet-dir",
        str(kubelet.root),
        "--nvml",
        f"fake:{nvml_file}",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        "--isolation",
        "none",
        "--kubeconfig",
        str(control_plane.kubeconfig),
    ]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await kubelet.wait_for(lambda: bool(kubelet.devices), timeout=30)
        assert kubelet.registrations[0].resource_name == names.RESOURCE_GPU_MEMORY
        response = await kubelet.admit(namespace, "p", "c", 3)
        assert response.envs[names.ENV_GRANTED_BYTES] == str(3 * 2**30)
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        assert f'gpushare_device_plugin_registered{{node="{node}"}} 1.0' in text
        for probe in ("healthz", "readyz"):  # kubelet's probes, on the same listener
            answer = await asyncio.to_thread(_read, f"http://127.0.0.1:{port}/{probe}")
            assert answer == "ok\n"
        annotations = control_plane.rest().get(f"/api/v1/nodes/{node}")["metadata"]["annotations"]
        report = nodereport.decode(annotations[names.ANNOTATION_NODE_REPORT])
        assert len(report.cards) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, output.decode()


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_a_missing_node_name_is_a_clear_error(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    result = subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "device-plugin", "--nvml", "fake:/nonexistent"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no node name: pass --node-name or set NODE_NAME" in result.stderr
