"""What the GPU proof measures of running servers: completions, latency, memory, metrics."""

import asyncio
import contextlib
import json
import math
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp

from benchmarks.gpuproof.common import GI, MI, PROMPT, Instance, Json, Options
from benchmarks.gpuproof.stack import Stack, command_of
from gpushare.core import names
from gpushare.deviceplugin import nvml


def cache_config(text: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info``."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {}


async def vllm_metrics(stack: Stack, instance: Instance) -> dict[str, str]:
    assert stack.http is not None
    async with stack.http.get(f"{instance.url}/metrics") as response:
        return cache_config(await response.text())


async def complete(stack: Stack, instance: Instance, tokens: int = 16) -> Json:
    assert stack.http is not None
    body = {"model": instance.name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    try:
        async with stack.http.post(f"{instance.url}/v1/completions", json=body) as response:
            answer = await response.json(content_type=None)
            ok = response.status == 200 and bool(answer.get("choices"))
            text = answer["choices"][0]["text"] if ok else str(answer)[:300]
            return {"ok": ok, "status": response.status, "text": text[:80]}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"ok": False, "error": repr(exc)}


async def stream_once(stack: Stack, instance: Instance, tokens: int) -> tuple[float, float, int]:
    """One streamed completion: time to the first token, mean time per later token, tokens."""
    assert stack.http is not None
    body = {
        "model": instance.name,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.perf_counter()
    first = last = 0.0
    chunks = 0
    produced = 0
    async with stack.http.post(f"{instance.url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{instance.name}: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices"):
                now = time.perf_counter()
                chunks += 1
                first = first or now
                last = now
            if event.get("usage"):
                produced = int(event["usage"].get("completion_tokens") or 0)
    produced = produced or chunks
    per_token = (last - first) / (produced - 1) if produced > 1 else math.nan
    return first - began, per_token, produced


def stats(values: Sequence[float]) -> Json:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {}
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e3, 2),
        "min_ms": round(ordered[0] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
    }


async def latency(stack: Stack, instance: Instance, opts: Options) -> Json:
    """``opts.requests`` streamed completions one after another (two warm-ups not counted)."""
    for _ in range(2):
        await stream_once(stack, instance, opts.tokens)
    ttfts, tpots, produced = [], [], []
    for _ in range(opts.requests):
        ttft, tpot, n = await stream_once(stack, instance, opts.tokens)
        ttfts.append(ttft)
        tpots.append(tpot)
        produced.append(n)
    return {
        "requests": opts.requests,
        "output_tokens": opts.tokens,
        "tokens_seen": sorted(set(produced)),
        "ttft": stats(ttfts),
        "per_token": stats(tpots),
        "ttft_samples_ms": [round(v * 1e3, 2) for v in ttfts],
        "per_token_samples_ms": [round(v * 1e3, 3) for v in tpots if not math.isnan(v)],
    }


async def repeated_latency(stack: Stack, instance: Instance, opts: Options) -> Json:
    """:func:`latency` ``opts.repeats`` times: pooled figures, each repeat's, and their spread."""
    runs = [await latency(stack, instance, opts) for _ in range(opts.repeats)]
    ttfts = [v / 1e3 for run in runs for v in run["ttft_samples_ms"]]
    tpots = [v / 1e3 for run in runs for v in run["per_token_samples_ms"]]

    def spread(key: str) -> list[float]:
        medians = [run[key]["p50_ms"] for run in runs if run[key]]
        return [min(medians), max(medians)] if medians else []

    return {
        "requests": opts.requests * opts.repeats,
        "output_tokens": opts.tokens,
        "tokens_seen": sorted({n for run in runs for n in run["tokens_seen"]}),
        "ttft": stats(ttfts),
        "per_token": stats(tpots),
        "repeats": [
            {
                "ttft_p50_ms": run["ttft"].get("p50_ms"),
                "per_token_p50_ms": run["per_token"].get("p50_ms"),
            }
            for run in runs
        ],
        "spread": {"ttft_p50_ms": spread("ttft"), "per_token_p50_ms": spread("per_token")},
    }


async def throughput(stack: Stack, servers: Sequence[Instance], opts: Options) -> Json:
    """Output tokens per second of each server in ``servers`` decoding at once.

    ``opts.busy_streams`` streamed requests per server without pause; after a three-second
    ramp, ``opts.repeats`` windows of ``opts.throughput_seconds`` each count the tokens of the
    requests that finished inside them (the figure per server is the windows' median, their
    lowest and highest beside it)."""
    finished: dict[str, list[tuple[float, int]]] = {s.name: [] for s in servers}
    errors: list[str] = []
    stop = asyncio.Event()

    async def loop(server: Instance) -> None:
        while not stop.is_set():
            try:
                _, _, n = await stream_once(stack, server, opts.tokens)
                finished[server.name].append((time.perf_counter(), n))
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                errors.append(f"{server.name}: {exc!r}")
                await asyncio.sleep(1)

    tasks = [asyncio.create_task(loop(s)) for s in servers for _ in range(opts.busy_streams)]
    try:
        await asyncio.sleep(3)
        windows = []
        for _ in range(opts.repeats):
            began = time.perf_counter()
            await asyncio.sleep(opts.throughput_seconds)
            ended = time.perf_counter()
            windows.append((began, ended))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    per_server: Json = {}
    for name, done in finished.items():
        rates = [
            sum(n for at, n in done if began <= at < ended) / (ended - began)
            for began, ended in windows
        ]
        per_server[name] = {
            "tokens_per_second": round(statistics.median(rates), 1),
            "spread": [round(min(rates), 1), round(max(rates), 1)],
        }
    return {
        "servers": [s.name for s in servers],
        "streams_per_server": opts.busy_streams,
        "output_tokens": opts.tokens,
        "window_seconds": opts.throughput_seconds,
        "windows": len(windows),
        "per_server": per_server,
        "errors": errors[:10],
    }


async def dedicated_and_shared(
    stack: Stack, target: Instance, ready: Sequence[Instance], opts: Options
) -> Json:
    """Throughput of ``target`` decoding with its neighbours idle (the card's compute to itself:
    as dedicated as a shared card gets), then of every server in ``ready`` decoding at once,
    each as a share of the first figure (the servers run the same model)."""
    alone = (await throughput(stack, [target], opts))["per_server"][target.name]
    together = await throughput(stack, ready, opts)
    base = alone["tokens_per_second"]
    rates = {name: row["tokens_per_second"] for name, row in together["per_server"].items()}
    return {
        "target_alone": {"name": target.name, **alone},
        "together": together,
        "share_of_alone_percent": {
            name: round(100 * rate / base, 1) for name, rate in rates.items() if base
        },
        "sum_of_alone_percent": round(100 * sum(rates.values()) / base, 1) if base else None,
    }


@contextlib.asynccontextmanager
async def busy(
    stack: Stack, others: Sequence[Instance], streams: int, tokens: int
) -> AsyncIterator[Json]:
    """Keep ``others`` decoding: ``streams`` concurrent streamed requests each, without pause."""
    stop = asyncio.Event()
    counts: Json = {o.name: 0 for o in others}
    errors: list[str] = []

    async def loop(instance: Instance) -> None:
        while not stop.is_set():
            try:
                _, _, n = await stream_once(stack, instance, tokens)
                counts[instance.name] += n
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                errors.append(f"{instance.name}: {exc!r}")
                await asyncio.sleep(1)

    tasks = [asyncio.create_task(loop(o)) for o in others for _ in range(streams)]
    report: Json = {"streams_per_neighbour": streams, "errors": errors}
    began = time.perf_counter()
    await asyncio.sleep(3)  # the neighbours reach their steady decode first
    try:
        yield report
    finally:
        stop.set()
        elapsed = time.perf_counter() - began
        await asyncio.gather(*tasks, return_exceptions=True)
        report["neighbour_tokens_per_second"] = {
            k: round(v / elapsed, 1) for k, v in counts.items()
        }
        report["errors"] = errors[:10]


async def snapshot(stack: Stack) -> nvml.Snapshot:
    return await asyncio.to_thread(stack.snapshot)


def per_instance_use(stack: Stack, snap: nvml.Snapshot) -> tuple[dict[str, int], list[Json]]:
    """NVML use summed per server (its process tree), and every GPU process seen."""
    names_by_root = {
        inst.proc.pid: inst.name for inst in stack.instances.values() if inst.proc is not None
    }
    used: dict[str, int] = {}
    listed = []
    for process in snap.processes:
        root = stack.locator.root_of(process.pid)
        owner = names_by_root.get(root) if root is not None else None
        if owner is not None:
            used[owner] = used.get(owner, 0) + process.used_bytes
        listed.append(
            {
                "pid": process.pid,
                "command": command_of(process.pid),
                "used_mib": round(process.used_bytes / MI, 1),
                "instance": owner,
            }
        )
    return used, listed


def card_json(card: nvml.CardReading) -> Json:
    return {
        "uuid": card.uuid,
        "model": card.model,
        "total_mib": card.total_bytes // MI,
        "reserved_mib": card.reserved_bytes // MI,
        "cuda_total_gib": round(card.cuda_total_bytes / GI, 3),
        "used_gib": round(card.used_bytes / GI, 3),
        "free_gib": round(card.free_bytes / GI, 3),
    }


def smi() -> Json:
    """nvidia-smi's view: the card and each compute process (MiB)."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on PATH"}
    try:
        gpu = (
            subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=memory.total,memory.used,memory.free,driver_version",
                    "--format=csv,noheader,nounits",
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.splitlines()[0]
            .split(",")
        )
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return {"error": repr(exc)}
    processes = {}
    for line in apps:
        pid, _, used = line.partition(",")
        with contextlib.suppress(ValueError):
            processes[int(pid)] = float(used)
    return {
        "total_mib": float(gpu[0]),
        "used_mib": float(gpu[1]),
        "free_mib": float(gpu[2]),
        "driver": gpu[3].strip(),
        "processes_mib": processes,
    }


async def figures(stack: Stack, *, budgets: Mapping[str, Json]) -> Json:
    """Per instance: grant, vLLM budget, NVML use, use outside grant and budget; the card."""
    await stack.after_poll()
    samples = await stack.plugin_samples()
    snap = await snapshot(stack)
    card = next(c for c in snap.cards if c.error is None)
    used, processes = per_instance_use(stack, snap)
    rows = []
    for inst in stack.instances.values():
        grant = int(inst.env[names.ENV_GRANTED_BYTES])
        info = budgets.get(inst.name, {})
        util = float(info.get("gpu_memory_utilization") or "nan")
        budget = util * card.cuda_total_bytes
        use = used.get(inst.name, 0)
        row: Json = {
            "name": inst.name,
            "grant_gib": round(grant / GI, 3),
            "utilization_env": inst.env.get(names.ENV_VLLM_UTILIZATION),
            "utilization_vllm": info.get("gpu_memory_utilization"),
            "vllm_budget_gib": round(budget / GI, 3),
            "nvml_used_gib": round(use / GI, 3),
            "outside_grant_mib": round((use - grant) / MI, 1),
            "outside_budget_mib": round((use - budget) / MI, 1),
            "startup_seconds": None if inst.ready_seconds is None else round(inst.ready_seconds, 1),
            "num_gpu_blocks": info.get("num_gpu_blocks"),
            "block_size": info.get("block_size"),
        }
        rows.append(row)
    granted = samples.get("gpushare_card_granted_bytes", 0.0)
    servers = int(samples.get("gpushare_card_mps_servers", 0.0))
    return {
        "instances": rows,
        "card": {
            **card_json(card),
            "sum_grants_gib": round(granted / GI, 3),
            "mps_servers": servers,
            "mps_server_bytes_assumed": stack.settings.agent.mps_server_bytes,
            "sum_instances_used_gib": round(sum(used.values()) / GI, 3),
            "left_gib": round((card.cuda_total_bytes - card.used_bytes) / GI, 3),
            "ledger": await stack.ledger(card.uuid, card.cuda_total_bytes),
        },
        "processes": processes,
    }


async def watchdog_and_exporter(stack: Stack) -> Json:
    """The agent attributes each server's use to its pod; its figures against nvidia-smi's."""
    deadline = time.monotonic() + 30
    while True:
        await stack.after_poll()
        samples = await stack.plugin_samples()
        keys = {f"gpushare_container_used_bytes/{i.pod}" for i in stack.instances.values()}
        if keys <= samples.keys() or time.monotonic() > deadline:
            break
    snap = await snapshot(stack)
    used, _ = per_instance_use(stack, snap)
    view: Json = smi() if not stack.opts.dry_run else {"error": "dry run: no nvidia-smi"}
    per_pid: dict[int, float] = view.get("processes_mib", {})
    rows = []
    for inst in stack.instances.values():
        exported = samples.get(f"gpushare_container_used_bytes/{inst.pod}")
        granted = samples.get(f"gpushare_container_granted_bytes/{inst.pod}")
        root = inst.proc.pid if inst.proc is not None else None
        pids = [p.pid for p in snap.processes if stack.locator.root_of(p.pid) == root]
        smi_mib = sum(per_pid.get(pid, 0.0) for pid in pids)
        row: Json = {
            "name": inst.name,
            "pod": inst.pod,
            "pids": pids,
            "nvml_used_mib": round(used.get(inst.name, 0) / MI, 1),
            "exporter_used_mib": None if exported is None else round(exported / MI, 1),
            "exporter_granted_gib": None if granted is None else round(granted / GI, 3),
            "attributed": exported is not None and exported > 0,
        }
        if "processes_mib" in view:
            row["nvidia_smi_used_mib"] = smi_mib
            if exported is not None and smi_mib:
                row["exporter_vs_smi_percent"] = round(100 * (exported / MI - smi_mib) / smi_mib, 3)
        rows.append(row)
    result: Json = {"containers": rows, "exporter": samples, "nvidia_smi": view}
    if "used_mib" in view:
        card_used = samples.get("gpushare_card_used_bytes", 0.0) / MI
        smi_used, smi_total = float(view["used_mib"]), float(view["total_mib"])
        result["card_used_exporter_mib"] = round(card_used, 1)
        result["card_used_smi_mib"] = smi_used
        result["card_used_diff_percent_of_total"] = round(
            100 * (card_used - smi_used) / smi_total, 3
        )
    return result
