"""Every dashboard query returns data from a real Prometheus scraping the real parts.

The extender, the webhook and a device plugin run as ``gpushare <part>`` processes against the
test apiserver with fake data: two GPU nodes (one with a stale agent report), the real
kube-scheduler running the manifests' profile, a pod bound to a card and admitted by a test kubelet
(its container over its grant, so the watchdog fires), a pod too large for any card, admission
reviews allowed and denied, a malformed extender call. A stand-in serves vLLM's metric names for
the pod, with the ``namespace`` and ``pod`` labels Prometheus' Kubernetes discovery adds.
Debian's Prometheus scrapes them all every second and evaluates the alert rules.
"""

import contextlib
import datetime as dt
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import prometheus_client
import pytest
import yaml

from dashboards import generate
from gpushare.core import names
from gpushare.simulator import mpsfake
from tests import cluster
from tests.manifests import panels, parts
from tests.manifests.render import MANIFESTS, render
from tests.manifests.test_apiserver import scheduler_config

GI: Final = 1024**3
POD: Final = "bloom-predictor-7d9f8-x2x9k"
TOO_LARGE: Final = "huge-predictor-5c4b3-q8r7t"
CONTAINER: Final = "kserve-container"
PID: Final = 4242
CONTAINER_ID: Final = "c0ffee" * 10 + "abcd"
CARDS: Final = (
    "GPU-0b5e0000-0000-4000-8000-00000000000a",
    "GPU-0b5e0000-0000-4000-8000-00000000000b",
)
SCRAPES: Final = 4
"""Samples each target must have before queries run: rate() needs two, a margin for the rest."""

class Kubelet:
    """The test kubelet, in its own process (tests/manifests/kubelet_process.py)."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self._log = log.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.manifests.kubelet_process", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=parts.ROOT,
        )
        self._answer()

    def ask(self, *words: object) -> str:
        assert self._process.stdin is not None
        self._process.stdin.write(" ".join(map(str, words)) + "\n")
        self._process.stdin.flush()
        return self._answer()

    def _answer(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("ok"):
            raise RuntimeError(f"test kubelet: {line or 'exited'}")
        return line.removeprefix("ok").strip()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


def _write_nvml(path: Path, processes: list[dict[str, Any]]) -> None:
    cards = [
        {"uuid": uuid, "index": i, "total": "80Gi", "used": "1Gi", "utilization": 0.3}
        for i, uuid in enumerate(CARDS)
    ]
    path.write_text(yaml.safe_dump({"cards": cards, "processes": processes}))


def _isvc_pod(name: str, namespace: str, units: int) -> dict[str, Any]:
    """The predictor pod of the InferenceService its name starts with."""
    service = name.split("-predictor-", maxsplit=1)[0]
    return parts.mutated_pod(
        name, namespace, units, labels={"serving.kserve.io/inferenceservice": service}
    )


def _review(resource: tuple[str, str, str], kind: str, obj: dict[str, Any]) -> bytes:
    group, version, plural = resource
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuidlib.uuid4()),
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": plural},
                "operation": "CREATE",
                "namespace": obj["metadata"]["namespace"],
                "name": obj["metadata"]["name"],
                "userInfo": {"username": "tester"},
                "object": obj,
                "dryRun": False,
            },
        }
    ).encode()


def _admit(url: str, body: bytes, ca: Path) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())["response"]
        return answer


def _vllm_exporter() -> tuple[int, http.server.ThreadingHTTPServer]:
    """vLLM's metric names for one server (values as a busy server shows them).

    Served in the classic text format whatever the scraper asks: prometheus-client's OpenMetrics
    output writes ``vllm:`` as ``vllm_`` for a Prometheus 2 (docs/install.md, "Prometheus").
    """
    registry = prometheus_client.CollectorRegistry()
    model = ["model_name"]
    gauges = {
        "vllm:kv_cache_usage_perc": 0.42,
        "vllm:num_requests_running": 3,
        "vllm:num_requests_waiting": 1,
    }
    for name, value in gauges.items():
        prometheus_client.Gauge(name, name, model, registry=registry).labels("bloom").set(value)
    info = ["block_size", "gpu_memory_utilization", "num_gpu_blocks", "cache_dtype"]
    prometheus_client.Gauge(
        "vllm:cache_config_info", "Cache config", info, registry=registry
    ).labels("16", "0.2441", "9000", "auto").set(1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = prometheus_client.generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1]), server


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = parts.get(url, timeout=10)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus(
    control_plane: cluster.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A Prometheus (its base URL) that has scraped every part, all of them busy, a few times."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    cp = control_plane
    work = tmp_path_factory.mktemp("observe")
    short = Path(tempfile.mkdtemp(prefix="gso", dir="/tmp"))  # unix socket paths stay short
    parts.install_kserve_crds(cp)  # kopf serves a resource's admission once discovery shows it
    namespace = cluster.create_namespace(cp, cluster.unique_name("observe"))
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        cp.kubectl("delete", kind, "gpushare-webhook", "--ignore-not-found")
    # One node-wide MPS daemon (the simulator's stand-in program), so that the container's process,
    # a CUDA context outside it, is caught as an escape (an Event only: the pod stays).
    settings = {
        "isolation": "mps-shared",
        "agent": {
            "poll_seconds": 0.2,
            "heartbeat_seconds": 1,
            "overuse_grace_seconds": 0,
            "escape_action": "event",
            "mps_root": str(short / "mps"),
        },
    }
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    env = {"KUBECONFIG": str(cp.kubeconfig), names.ENV_CONFIG_FILE: str(config_file)}

    node = cluster.unique_name("obs-gpu")
    cluster.register_gpu_node(
        cp, node, [cluster.gpu_card(i, uuid=uuid) for i, uuid in enumerate(CARDS)], owner=namespace
    )
    stale = cluster.unique_name("obs-stale")
    old = cluster.node_report(
        [cluster.gpu_card(0)], heartbeat=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    )
    cluster.register_gpu_node(cp, stale, [cluster.gpu_card(0)], owner=namespace, report=old)
    nvml = work / "nvml.yaml"
    _write_nvml(nvml, [])
    proc = short / "proc"
    proc.mkdir()

    kubelet = Kubelet(short / "kubelet", work / "kubelet.log")
    pair = work / "pair"
    subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "certs", "--out", str(pair), "--dns", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    extender_port, agent_port = cluster.free_port(), cluster.free_port()
    webhook_port, probe_port, prometheus_port = (
        cluster.free_port(),
        cluster.free_port(),
        cluster.free_port(),
    )
    vllm_port, vllm_server = _vllm_exporter()
    try:
        with (
            parts.run(
                "scheduler",
                f"--listen=127.0.0.1:{extender_port}",
                log=work / "extender.log",
                env=env,
            ) as extender,
            parts.run(
                "device-plugin",
                f"--kubelet-dir={kubelet.root}",
                f"--nvml=fake:{nvml}",
                f"--metrics-listen=127.0.0.1:{agent_port}",
                f"--node-name={node}",
                f"--proc-root={proc}",
                f"--mps-control={mpsfake.install(short / 'bin')}",
                log=work / "agent.log",
                env=env,
            ) as agent,
            parts.run(
                "webhook",
                f"--listen=127.0.0.1:{webhook_port}",
                f"--tls-cert={pair / 'tls.crt'}",
                f"--tls-key={pair / 'tls.key'}",
                f"--probe-listen=127.0.0.1:{probe_port}",
                log=work / "webhook.log",
                env=env,
            ) as webhook,
        ):
            parts.wait_ok(f"http://127.0.0.1:{extender_port}/readyz", extender)
            parts.wait_ok(f"http://127.0.0.1:{probe_port}/readyz", webhook)
            parts.wait_ok(f"http://127.0.0.1:{agent_port}/metrics", agent)
            kubelet.ask("devices")
            config = scheduler_config(
                render(MANIFESTS), extender=f"127.0.0.1:{extender_port}", kubeconfig=cp.kubeconfig
            )
            with cp.start_scheduler(config):
                _drive(
                    cp,
                    namespace,
                    node,
                    kubelet,
                    nvml,
                    proc,
                    agent,
                    agent_port=agent_port,
                    extender_port=extender_port,
                )
            _review_some(webhook_port, pair / "ca.crt", namespace)
            base = f"http://127.0.0.1:{prometheus_port}"
            with _prometheus(
                binary,
                work,
                base,
                prometheus_port,
                {
                    "gpushare-scheduler": (extender_port, {}),
                    "gpushare-device-plugin": (agent_port, {}),
                    "gpushare-webhook": (probe_port, {}),
                    "vllm": (vllm_port, {"namespace": namespace, "pod": POD}),
                },
            ):
                yield base
    finally:
        vllm_server.shutdown()
        kubelet.close()
        shutil.rmtree(short, ignore_errors=True)
        cluster.cleanup_namespace(cp, namespace)


def _drive(
    cp: cluster.ControlPlane,
    namespace: str,
    node: str,
    kubelet: Kubelet,
    nvml: Path,
    proc: Path,
    agent: parts.Part,
    *,
    agent_port: int,
    extender_port: int,
) -> None:
    """Bind a pod, admit it, run it over its grant; a pod that fits nowhere; a malformed call."""
    cp.kubectl("create", "-f", "-", input=json.dumps(_isvc_pod(POD, namespace, 20)))
    cp.kubectl("create", "-f", "-", input=json.dumps(_isvc_pod(TOO_LARGE, namespace, 100)))

    def bound() -> dict[str, Any] | None:
        pod = json.loads(cp.kubectl("get", "pod", POD, "-n", namespace, "-o", "json").stdout)
        return pod if pod["spec"].get("nodeName") else None

    pod = cluster.wait_for(bound, timeout=60, what=f"{POD} to be bound")
    assert pod["spec"]["nodeName"] == node
    card = pod["metadata"]["annotations"][names.ANNOTATION_CARD_UUID]
    status = {
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": CONTAINER,
                    "containerID": f"containerd://{CONTAINER_ID}",
                    "image": "vllm/vllm-openai:latest",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ],
        }
    }
    cp.kubectl(
        "patch",
        "pod",
        POD,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    kubelet.ask("admit", namespace, POD, CONTAINER, 20)
    (proc / str(PID)).mkdir()
    uid = pod["metadata"]["uid"].replace("-", "_")
    (proc / str(PID) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{CONTAINER_ID}.scope\n"
    )
    _write_nvml(nvml, [{"pid": PID, "card": card, "used": f"{21 * GI}", "kind": "cuda"}])

    def exported() -> bool:
        agent.check_alive()
        metrics = parts.get(f"http://127.0.0.1:{agent_port}/metrics")[1]
        return all(
            any(line.startswith(metric) for line in metrics.splitlines())
            for metric in (
                "gpushare_container_granted_bytes{",
                "gpushare_grant_violations_total{",
                "gpushare_isolation_escapes_total{",
            )
        )

    try:
        cluster.wait_for(
            exported, timeout=60, what="the agent to export the container and its violation"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{agent.log()}") from exc
    request = urllib.request.Request(
        f"http://127.0.0.1:{extender_port}/gpushare-scheduler/filter",
        data=b"{not json",
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
    else:
        pytest.fail("the extender accepted a malformed filter call")


def _review_some(port: int, ca: Path, namespace: str) -> None:
    """A pod mutated and an InferenceService denied, as the apiserver would ask."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "opt-predictor-1",
            "namespace": namespace,
            "annotations": {names.ANNOTATION_GPU_MEMORY: "12Gi"},
        },
        "spec": {
            "containers": [
                {
                    "name": CONTAINER,
                    "image": "vllm/vllm-openai:latest",
                    "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                }
            ]
        },
    }
    answer = _admit(
        f"https://127.0.0.1:{port}/mutate-pods", _review(("", "v1", "pods"), "Pod", pod), ca
    )
    assert answer["allowed"] and answer.get("patch"), answer
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": "bad",
            "namespace": namespace,
            "annotations": {names.ANNOTATION_GPU_MEMORY: "banana"},
        },
        "spec": {
            "predictor": {
                "containers": [
                    {
                        "name": CONTAINER,
                        "image": "vllm/vllm-openai:latest",
                        "resources": {"limits": {names.NVIDIA_GPU_RESOURCE: "1"}},
                    }
                ]
            }
        },
    }
    resource = ("serving.kserve.io", "v1beta1", "inferenceservices")
    answer = _admit(
        f"https://127.0.0.1:{port}/validate-inferenceservices",
        _review(resource, "InferenceService", isvc),
        ca,
    )
    assert not answer["allowed"], answer


@contextlib.contextmanager
def _prometheus(
    binary: str, work: Path, base: str, port: int, targets: dict[str, tuple[int, dict[str, str]]]
) -> Iterator[None]:
    """Prometheus scraping ``targets`` (job: port, labels) every second, with the alert rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(generate.ALERTS)],
        "scrape_configs": [
            {
                "job_name": job,
                # As the manifests' PodMonitor for the device plugin: keep the exporter's own
                # namespace and pod labels (they name the pods it describes).
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{target}"], "labels": labels}],
            }
            for job, (target, labels) in targets.items()
        ],
    }
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = work / "prometheus.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def scraped() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{cluster.tail(log)}")
            try:
                result = _query(base, "count_over_time(up[1m])")
            except (OSError, AssertionError, json.JSONDecodeError):
                return False
            counts = {r["metric"]["job"]: float(r["value"][1]) for r in result}
            ups = {r["metric"]["job"]: float(r["value"][1]) for r in _query(base, "up")}
            return (
                set(counts) == set(targets)
                and min(counts.values()) >= SCRAPES
                and min(ups.values()) == 1
            )

        cluster.wait_for(scraped, timeout=60, interval=0.5, what="Prometheus to scrape every part")
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cases() -> list[Any]:
    cases = []
    for board in panels.dashboards().values():
        for query in panels.queries(board):
            cases.append(pytest.param(board["uid"], query.expr, id=query.where))
    return cases


@pytest.mark.parametrize(("uid", "expr"), _cases())
def test_a_panel_query_returns_data(prometheus: str, uid: str, expr: str) -> None:
    board = panels.dashboards()[uid]
    result = _query(prometheus, panels.expand(expr, board))
    assert result, f"no series for {panels.expand(expr, board)}"


def test_every_template_variable_offers_values(prometheus: str) -> None:
    for board in panels.dashboards().values():
        for name, variable in panels.variables(board).items():
            if variable["type"] != "query":
                continue
            text = variable["query"].removeprefix("label_values(").removesuffix(")")
            selector, _, label = text.rpartition(",")
            selector = panels.expand(selector, board)
            url = f"{prometheus}/api/v1/label/{label.strip()}/values?" + urllib.parse.urlencode(
                {"match[]": selector}
            )
            values = json.loads(parts.get(url)[1])["data"]
            assert values, f"{board['uid']}: ${name} offers nothing ({selector})"


def test_every_alert_rule_evaluates(prometheus: str) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = json.loads(parts.get(f"{prometheus}/api/v1/rules")[1])["data"]["groups"]
        rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
        return (
            rules
            if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)
            else None
        )

    rules = cluster.wait_for(evaluated, timeout=30, what="the alert rules to be evaluated")
    assert {rule["name"] for rule in rules} == {
        rule["alert"]
        for group in yaml.safe_load(generate.ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_the_stale_node_and_the_container_over_its_grant_raise_their_alerts(
    prometheus: str,
) -> None:
    # Their `for:` is minutes: here they are pending, which is the conditions holding.
    expected = {("GpushareContainerOverGrant", ""), ("GpushareAgentHeartbeatLost", "scheduler")}

    def active() -> set[tuple[str, str]] | None:
        alerts = json.loads(parts.get(f"{prometheus}/api/v1/alerts")[1])["data"]["alerts"]
        found = {(a["labels"]["alertname"], a["labels"].get("source", "")) for a in alerts}
        return found if expected <= found else None

    cluster.wait_for(active, timeout=30, interval=0.5, what=f"the alerts {sorted(expected)}")
