"""Admission latency of the gpushare webhook, and what it adds to creating a pod.

    python -m benchmarks.webhook_latency [--rate 200] [--seconds 10] [--pods 100] [--json]

1. Pod mutation over HTTPS on loopback, open loop at ``--rate`` requests/s (one AdmissionReview
   of a KServe predictor pod each): latency from each request's scheduled send time to its
   answer, so a stall delays every request queued behind it (no coordinated omission).
2. The same annotated pod created through the real kube-apiserver (built by
   tests/controlplane/build.sh) without the webhook configurations, with them, and without them
   again, one after the other in one run; plus a pod without the annotation while they are
   registered (matchConditions keep it away from the webhook).
"""

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gpushare.core import names
from gpushare.webhook import certs, paths
from tests import cluster
from tests.webhook import builders, strategies
from tests.webhook.process import Webhook, configurations


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1] * 1000}


async def admission_load(webhook: Webhook, *, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop load on /mutate-pods; latencies and errors."""
    pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
    context = ssl.create_default_context(cafile=str(webhook.pair / "ca.crt"))
    url = f"{webhook.url}/{paths.MUTATE_PODS}"
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(ssl=context, limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Content-Type": "application/json"}

        async def one(body: bytes, scheduled: float) -> None:
            nonlocal errors
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
            if response.status != 200 or b'"patch"' not in answer:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        total = int(rate * seconds)
        # Serialized beforehand (each with its own uid): the client spends its time sending.
        bodies = [json.dumps(strategies.review(pod)).encode() for _ in range(total + 50)]
        for body in bodies[total:]:  # warm-up: TLS handshakes, first calls
            await one(body, time.perf_counter())
        latencies.clear()
        before = webhook.metrics()
        start = time.perf_counter()
        tasks = []
        for index in range(total):
            scheduled = start + index / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(bodies[index], scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "requests": total,
        "errors": errors,
        "achieved_rate": total / elapsed,
        **percentiles(latencies),
        "server": server_side(before, webhook.metrics()),
        "load_average": os.getloadavg()[0],
    }


def server_side(before: dict[Any, float], after: dict[Any, float]) -> dict[str, float]:
    """The webhook's own view (its duration histogram): mean, and shares under 5 and 10 ms."""
    name = "gpushare_webhook_request_duration_seconds"
    labels = (("webhook", paths.MUTATE_PODS),)

    def delta(suffix: str, extra: tuple[tuple[str, str], ...] = ()) -> float:
        key = (name + suffix, tuple(sorted(labels + extra)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = delta("_count")
    return {
        "mean_ms": delta("_sum") / count * 1000,
        "under_5ms": delta("_bucket", (("le", "0.005"),)) / count,
        "under_10ms": delta("_bucket", (("le", "0.01"),)) / count,
    }


def creation_latency(
    cp: cluster.ControlPlane, namespace: str, body: dict[str, Any], count: int
) -> dict[str, float]:
    """Round-trip time of ``count`` pod creations through the apiserver."""
    rest = cp.rest()
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        rest.create(f"/api/v1/namespaces/{namespace}/pods", body)
        samples.append(time.perf_counter() - began)
    return {"mean": statistics.fmean(samples) * 1000, **percentiles(samples)}


def wait_until(probe: Callable[[], bool], what: str) -> None:
    cluster.wait_for(lambda: probe() or None, timeout=30, what=what)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, cluster.ControlPlane() as cp:
        pair = Path(tmp) / "pair"
        certs.write(certs.make(["127.0.0.1"]), pair)
        webhook = Webhook(cp.kubeconfig, pair, Path(tmp) / "webhook.log")
        webhook.start()
        try:
            results["admission"] = asyncio.run(
                admission_load(webhook, rate=args.rate, seconds=args.seconds)
            )
            namespace = cluster.create_namespace(cp, "bench")
            pod = builders.predictor_pod(builders.isvc("isvc-vllm-openai.yaml"))
            pod["metadata"].pop("namespace")
            plain = builders.job_pod()
            del plain["metadata"]["annotations"]
            rest = cp.rest()

            def mutated() -> bool:
                stored = rest.create(f"/api/v1/namespaces/{namespace}/pods", pod, dryRun="All")
                return bool(stored["spec"].get("schedulerName") == names.SCHEDULER_NAME)

            creation_latency(cp, namespace, pod, 10)  # warm-up
            results["create_without_webhook"] = creation_latency(cp, namespace, pod, args.pods)
            bodies = configurations(webhook)
            cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(bodies))
            wait_until(mutated, "the webhook configurations to take effect")
            creation_latency(cp, namespace, pod, 10)
            results["create_with_webhook"] = creation_latency(cp, namespace, pod, args.pods)
            results["create_unannotated_with_webhook"] = creation_latency(
                cp, namespace, plain, args.pods
            )
            for body in bodies:
                cp.kubectl("delete", body["kind"].lower(), body["metadata"]["name"])
            wait_until(lambda: not mutated(), "the webhook configurations to be gone")
            results["create_without_webhook_again"] = creation_latency(
                cp, namespace, pod, args.pods
            )
        finally:
            webhook.stop()
    return results


def report(results: dict[str, Any]) -> str:
    admission = results["admission"]
    lines = [
        f"Pod mutation over HTTPS, open loop at {admission['achieved_rate']:.0f} req/s"
        f" ({admission['requests']} requests, {admission['errors']} errors):",
        f"  p50 {admission['p50']:.2f} ms   p90 {admission['p90']:.2f} ms"
        f"   p99 {admission['p99']:.2f} ms   max {admission['max']:.2f} ms   (target p99 <= 10 ms)",
        f"  in the webhook: mean {admission['server']['mean_ms']:.2f} ms,"
        f" {admission['server']['under_5ms']:.1%} under 5 ms,"
        f" {admission['server']['under_10ms']:.1%} under 10 ms"
        f"   (machine load average {admission['load_average']:.2f} on {os.cpu_count()} cores)",
        "",
        "Pod creation through kube-apiserver (ms):     mean    p50    p90    p99    max",
    ]
    for key, label in (
        ("create_without_webhook", "annotated pod, no webhook registered"),
        ("create_with_webhook", "annotated pod, webhook registered"),
        ("create_unannotated_with_webhook", "plain pod, webhook registered"),
        ("create_without_webhook_again", "annotated pod, no webhook (again)"),
    ):
        r = results[key]
        lines.append(
            f"  {label:<40} {r['mean']:6.2f} {r['p50']:6.2f} {r['p90']:6.2f}"
            f" {r['p99']:6.2f} {r['max']:6.2f}"
        )
    baseline = (
        results["create_without_webhook"]["p50"] + results["create_without_webhook_again"]["p50"]
    ) / 2
    lines.append(
        f"  webhook adds {results['create_with_webhook']['p50'] - baseline:+.2f} ms at p50"
        " to an annotated pod's creation"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="admission requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the load")
    parser.add_argument("--pods", type=int, default=100, help="pods created per condition")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
