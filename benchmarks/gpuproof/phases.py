"""The GPU proof's phases: alone, four packed, four started together, refusals, compute share."""

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.gpuproof.common import (
    GREEDY,
    NEIGHBOUR,
    READY_SECONDS,
    REFUSAL,
    TOO_MANY,
    Instance,
    Json,
    Options,
)
from benchmarks.gpuproof.measure import (
    busy,
    card_json,
    complete,
    dedicated_and_shared,
    figures,
    repeated_latency,
    smi,
    vllm_metrics,
    watchdog_and_exporter,
)
from benchmarks.gpuproof.report import Results, plot
from benchmarks.gpuproof.stack import Stack, exit_or_refusal
from gpushare.core import names
from gpushare.deviceplugin import nvml
from gpushare.simulator import mpsfake


def time_left(opts: Options, need: float) -> bool:
    return time.monotonic() + need < opts.deadline


async def start_all(
    stack: Stack,
    results: Results,
    entry: Json,
    wanted: Sequence[tuple[str, int]],
    *,
    annotations: Mapping[str, str] | None = None,
) -> list[Instance]:
    """Submit and start each service; the next starts once the last has sized its cache."""
    submitted = entry.setdefault("submitted", [])
    started: list[Instance] = []
    watchers: list[asyncio.Task[bool]] = []
    began = time.monotonic()
    for name, gib in wanted:
        record = await stack.submit(name, gib, annotations=annotations)
        submitted.append(record)
        if "refused_by" in record:
            results.note(f"{name}: refused by {record['refused_by']}: {record['reason']}")
            continue
        instance = stack.instances[name]
        await stack.spawn(instance)
        results.note(
            f"{name}: granted {instance.env[names.ENV_GRANTED_BYTES]} bytes, utilization"
            f" {instance.env.get(names.ENV_VLLM_UTILIZATION)}, started"
        )
        started.append(instance)
        watchers.append(asyncio.create_task(stack.wait_ready(instance, READY_SECONDS)))
        await stack.wait_sized_or_ready(instance, READY_SECONDS)
    oks = [await watcher for watcher in watchers]
    entry["all_ready_seconds"] = round(time.monotonic() - began, 1)
    return await _keep_ready(stack, results, entry, started, oks)


async def _keep_ready(
    stack: Stack, results: Results, entry: Json, started: Sequence[Instance], oks: Sequence[bool]
) -> list[Instance]:
    """Note each start; release (and keep the log tail of) each server that never answered."""
    for instance, ok in zip(started, oks, strict=True):
        results.note(
            f"{instance.name}: ready {instance.ready_seconds:.1f} s after its start"
            if ok
            else f"{instance.name}: NOT ready"
        )
        if not ok:
            entry.setdefault("failed", {})[instance.name] = instance.log_tail(40)
            await stack.release(instance)
    return [i for i, ok in zip(started, oks, strict=True) if ok]


async def start_together(
    stack: Stack, results: Results, entry: Json, wanted: Sequence[tuple[str, int]]
) -> list[Instance]:
    """Admit every service, then start them all at once, as kubelet starts the pods of a card."""
    submitted = entry.setdefault("submitted", [])
    admitted: list[Instance] = []
    for name, gib in wanted:
        record = await stack.submit(name, gib)
        submitted.append(record)
        if "refused_by" in record:
            results.note(f"{name}: refused by {record['refused_by']}: {record['reason']}")
        else:
            admitted.append(stack.instances[name])
    began = time.monotonic()
    await asyncio.gather(*(stack.spawn(i) for i in admitted))
    results.note(f"started {[i.name for i in admitted]} together")
    oks = await asyncio.gather(*(stack.wait_ready(i, READY_SECONDS) for i in admitted))
    entry["all_ready_seconds"] = round(time.monotonic() - began, 1) if all(oks) else None
    return await _keep_ready(stack, results, entry, admitted, oks)


async def phase_concurrent(opts: Options, results: Results, work: Path, name: str) -> None:
    """The four services started at once (vllm#55827: instances that profile memory together can
    mis-size each other): each one's KV cache, start failures, time to all ready. The isolation
    is ``mps`` unless the phase's name says ``none`` or ``shared`` (``concurrent-none-1``)."""
    isolation = "none" if "-none" in name else "mps-shared" if "-shared" in name else "mps"
    await _start_and_measure(opts, results, work, name, isolation, together=True)


async def phase_sequential(opts: Options, results: Results, work: Path) -> None:
    """The services started one after another under ``mps`` (the next once the last has sized
    its KV cache): the reference of the concurrent starts, and the throughput of the servers."""
    await _start_and_measure(opts, results, work, "sequential", "mps", together=False)


async def _start_and_measure(
    opts: Options,
    results: Results,
    work: Path,
    name: str,
    isolation: str,
    *,
    together: bool,
) -> None:
    """Start the services (at once, or each once the last has sized its cache), then record
    their figures and throughput."""
    entry = results.phase(name)
    entry["isolation"] = isolation
    entry["start"] = "concurrent" if together else "sequential"
    stack = Stack(opts, isolation, work, results)
    try:
        await stack.start()
        if together:
            ready = await start_together(stack, results, entry, opts.instances)
        else:
            ready = await start_all(stack, results, entry, opts.instances)
        entry["ready"] = [i.name for i in ready]
        results.save()
        if ready:
            await measure_instances(stack, entry, "ready")
            await measure_throughput(stack, results, entry, ready, opts)
    finally:
        await stack.stop()
        results.save()


async def measure_throughput(
    stack: Stack, results: Results, entry: Json, ready: Sequence[Instance], opts: Options
) -> None:
    """Each server's throughput beside idle and beside busy neighbours, if asked and time allows."""
    target = next((i for i in ready if i.name == opts.target), None)
    windows = (opts.repeats * opts.throughput_seconds + 5) * 2
    if target is None or opts.throughput_seconds <= 0 or not time_left(opts, windows):
        return
    entry["throughput"] = await dedicated_and_shared(stack, target, ready, opts)
    results.note(f"throughput: {entry['throughput']['share_of_alone_percent']} % of alone")


async def measure_instances(stack: Stack, entry: Json, when: str) -> Json:
    budgets = {inst.name: await vllm_metrics(stack, inst) for inst in stack.instances.values()}
    measured = await figures(stack, budgets=budgets)
    entry.setdefault("figures", {})[when] = measured
    return measured


async def phase_alone(opts: Options, results: Results, work: Path) -> None:
    entry = results.phase("alone")
    entry["isolation"] = "none"
    stack = Stack(opts, "none", work, results)
    try:
        await stack.start()
        results.note("alone: stack up (isolation none)")
        wanted = [(n, g) for n, g in opts.instances if n == opts.target]
        ready = await start_all(stack, results, entry, wanted)
        if not ready:
            return
        target = ready[0]
        entry["completion"] = await complete(stack, target)
        await measure_instances(stack, entry, "ready")
        entry["latency"] = await repeated_latency(stack, target, opts)
        results.note(f"alone: latency {entry['latency']['ttft']} / {entry['latency']['per_token']}")
        await measure_instances(stack, entry, "after load")
    finally:
        await stack.stop()
        results.save()


async def phase_shared(opts: Options, results: Results, work: Path, isolation: str) -> None:
    entry = results.phase(isolation)
    entry["isolation"] = isolation
    stack = Stack(opts, isolation, work, results)
    try:
        await stack.start()
        results.note(f"{isolation}: stack up; {stack.kubelet.allocatable} healthy IDs")
        ready = await start_all(stack, results, entry, opts.instances)
        entry["ready"] = [i.name for i in ready]
        results.save()
        if not ready:
            return
        entry["completions"] = {i.name: await complete(stack, i) for i in ready}
        results.note(f"{isolation}: completions {[c['ok'] for c in entry['completions'].values()]}")
        before = await measure_instances(stack, entry, "ready")
        entry["watchdog"] = await watchdog_and_exporter(stack)
        results.note(f"{isolation}: figures and watchdog recorded")
        if len(ready) < len(opts.instances):
            return
        if isolation == "mps":
            await refusals(stack, results, entry, before)
        target = next(i for i in ready if i.name == opts.target)
        others = [i for i in ready if i is not target]
        if time_left(opts, 60):
            entry["latency_idle"] = await repeated_latency(stack, target, opts)
            results.note(f"{isolation}: idle neighbours {entry['latency_idle']['ttft']}")
        if time_left(opts, 60):
            async with busy(stack, others, opts.busy_streams, opts.tokens) as load:
                measured = await repeated_latency(stack, target, opts)
            entry["latency_busy"] = {**measured, "load": load}
            results.note(f"{isolation}: busy neighbours {measured['ttft']} / {load}")
            await measure_instances(stack, entry, "after load")
            entry["watchdog_after_load"] = await watchdog_and_exporter(stack)
        await measure_throughput(stack, results, entry, ready, opts)
    finally:
        await stack.stop()
        results.save()


async def phase_share(opts: Options, results: Results, work: Path) -> None:
    """A busy neighbour with and without a compute share: the target's latency beside it idle,
    busy with every SM, and busy capped at ``opts.share`` percent (``gpushare.io/compute-share``
    on its InferenceService, so the plugin sets its MPS daemon's active-thread percentage)."""
    entry = results.phase("share")
    entry["isolation"] = "mps"
    entry["share_percent"] = opts.share
    stack = Stack(opts, "mps", work, results)
    try:
        await stack.start()
        target_gib = dict(opts.instances).get(opts.target, 20)
        ready = await start_all(stack, results, entry, [(opts.target, target_gib), NEIGHBOUR])
        if len(ready) < 2:
            return
        target, neighbour = ready
        entry["latency_idle"] = await repeated_latency(stack, target, opts)
        results.note(f"share: idle neighbour {entry['latency_idle']['ttft']}")
        async with busy(stack, [neighbour], opts.busy_streams, opts.tokens) as load:
            measured = await repeated_latency(stack, target, opts)
        entry["latency_busy_uncapped"] = {**measured, "load": load}
        results.note(f"share: uncapped neighbour {measured['ttft']} / {load}")
        await stack.release(neighbour)
        share = {names.ANNOTATION_COMPUTE_SHARE: str(opts.share)}
        capped_entry = entry.setdefault("capped_start", {})
        name, gib = NEIGHBOUR
        wanted = [(f"{name}-capped", gib)]
        restarted = await start_all(stack, results, capped_entry, wanted, annotations=share)
        if not restarted:
            return
        entry["capped_env"] = {
            k: v for k, v in restarted[0].env.items() if k.startswith("CUDA_MPS_")
        }
        async with busy(stack, restarted, opts.busy_streams, opts.tokens) as load:
            measured = await repeated_latency(stack, target, opts)
        entry["latency_busy_capped"] = {**measured, "load": load}
        results.note(f"share: neighbour capped at {opts.share}% {measured['ttft']} / {load}")
    finally:
        await stack.stop()
        results.save()


async def refusals(stack: Stack, results: Results, entry: Json, before: Json) -> None:
    """A fifth service that does not fit; a server whose utilization exceeds its grant."""
    name, gib = TOO_MANY
    record = await stack.submit(name, gib)
    entry["refused_by_extender"] = record
    results.note(f"{name}: {record.get('refused_by', 'NOT refused')}: {record.get('reason', '')}")
    if "refused_by" not in record:
        await stack.release(stack.instances[name])
    name, gib, utilization = GREEDY
    record = await stack.submit(name, gib)
    greedy: Json = {"submitted": record, "utilization_by_hand": utilization}
    entry["refused_by_vllm"] = greedy
    if "refused_by" in record:
        results.note(f"{name}: refused before its start: {record['reason']}")
        return
    instance = stack.instances[name]
    # The container's own entrypoint adds a flag after the webhook's: vLLM takes the last one.
    await stack.spawn(instance, extra=[f"--gpu-memory-utilization={utilization}"])
    code = await exit_or_refusal(instance)
    text = instance.log_text()
    message = REFUSAL.search(text)
    greedy.update(
        {
            "exit_code": code,
            "seconds_to_exit": round(time.monotonic() - instance.spawned, 1),
            "refused": code not in (None, 0) and message is not None,
            "message": message[0] if message else None,
            "log_tail": instance.log_tail(12),
        }
    )
    free = re.search(r"\(([\d.]+)/([\d.]+) GiB\) on startup", text)
    if free:
        greedy["free_seen_gib"] = float(free[1])
        greedy["context_at_check_mib"] = round((gib - float(free[1])) * 1024, 1)
    results.note(f"{name}: exit {code}: {greedy['message']}")
    await stack.release(instance)
    after = await measure_instances(stack, entry, "after refusals")
    completions = {i.name: await complete(stack, i) for i in stack.instances.values()}
    was = {r["name"]: r["nvml_used_gib"] for r in before["instances"]}
    entry["undisturbed"] = {
        "completions_ok": all(c["ok"] for c in completions.values()),
        "alive": all(
            i.proc is not None and i.proc.returncode is None for i in stack.instances.values()
        ),
        "used_gib_before": was,
        "used_gib_after": {r["name"]: r["nvml_used_gib"] for r in after["instances"]},
    }
    results.note(f"undisturbed: {entry['undisturbed']}")


def machine(opts: Options) -> Json:
    info: Json = {
        "python": sys.version.split()[0],
        "dry_run": opts.dry_run,
        "server": "stand-in" if opts.fake_server else "vLLM",
    }
    if not opts.dry_run:
        view = smi()
        info["nvidia_smi"] = {k: v for k, v in view.items() if k != "processes_mib"}
        with contextlib.suppress(Exception):
            backend = nvml.RealNvml()
            info["cards"] = [card_json(c) for c in backend.snapshot().cards]
            backend.close()
    if not opts.fake_server:
        probe = subprocess.run(
            [opts.python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": opts.server_pythonpath},
            check=False,
        )
        info["vllm_torch"] = probe.stdout.strip() or probe.stderr.strip()[-300:]
    return info


async def run(opts: Options) -> Json:
    opts.out.mkdir(parents=True, exist_ok=True)
    results = Results(opts.out / "gpu-proof.json", {"schema": 1})
    results.data["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    results.data["options"] = {
        "phases": list(opts.phases),
        "requests": opts.requests,
        "output_tokens": opts.tokens,
        "busy_streams": opts.busy_streams,
        "enforce_eager": opts.eager,
        "model": opts.model,
        "instances": dict(opts.instances),
        "target": opts.target,
        "repeats": opts.repeats,
        "share_percent": opts.share,
        "max_model_len": opts.max_model_len,
        "reserve": opts.reserve or "default",
    }
    results.data["machine"] = machine(opts)
    results.note(f"machine: {results.data['machine']}")
    work = Path(tempfile.mkdtemp(prefix="gp-", dir="/tmp"))
    control = opts.mps_control
    if opts.dry_run:
        control = str(mpsfake.install(work / "bin"))
        opts = dataclasses.replace(opts, mps_control=control)
    try:
        for phase in opts.phases:
            if not time_left(opts, 90):
                results.note(f"{phase}: skipped, too little time left")
                continue
            results.note(f"phase {phase}")
            try:
                if phase == "alone":
                    await phase_alone(opts, results, work / "alone")
                elif phase == "sequential":
                    await phase_sequential(opts, results, work / "sequential")
                elif phase == "share":
                    await phase_share(opts, results, work / "share")
                elif phase.startswith("concurrent"):
                    await phase_concurrent(opts, results, work / phase, phase)
                else:
                    await phase_shared(opts, results, work / phase, phase)
            except Exception as exc:
                results.phase(phase)["error"] = repr(exc)
                results.note(f"{phase}: FAILED: {exc!r}")
            await settle(opts)
    finally:
        keep_logs(work, opts.out)
        results.save()
        with contextlib.suppress(Exception):
            plot(results.data, opts.out / "gpu-proof.png")
        shutil.rmtree(work, ignore_errors=True)
    return results.data


async def settle(opts: Options) -> None:
    """Wait until the card holds no process of ours (the next phase measures a clean card)."""
    if opts.dry_run:
        return
    backend = nvml.RealNvml()
    try:
        for _ in range(60):
            if not (await asyncio.to_thread(backend.snapshot)).processes:
                return
            await asyncio.sleep(0.5)
    finally:
        backend.close()


def keep_logs(work: Path, out: Path) -> None:
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for log in sorted(work.glob("*/*.log")):
            archive.add(log, arcname=f"{log.parent.name}/{log.name}")
        for log in sorted(work.glob("*/cluster/logs/*.log")):  # the parts' own
            archive.add(log, arcname=f"{log.parents[2].name}/parts/{log.name}")
