"""The GPU proof's summary, its picture and the merge of several runs."""

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpuproof.common import MI, TARGET, Json
from gpushare.core import config


class Results:
    """The run's JSON, written after every step (atomically) so a cut-short run leaves figures."""

    def __init__(self, path: Path, data: Json) -> None:
        self.path = path
        self.data = data
        self.started = time.monotonic()

    def phase(self, name: str) -> Json:
        phases: Json = self.data.setdefault("phases", {})
        entry: Json = phases.setdefault(name, {})
        return entry

    def note(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:7.1f}s"
        print(f"[{stamp}] {text}", flush=True)
        self.data.setdefault("steps", []).append(f"{stamp} {text}")
        self.save()

    def save(self) -> None:
        self.data["summary"] = summarize(self.data)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.path)


def summarize(data: Json) -> Json:
    """The figures a reader wants first: latency in five conditions, the reserve, the card."""
    phases = data.get("phases", {})
    summary: Json = {"latency": {}}
    conditions = [
        ("alone, no MPS", "alone", "latency"),
        ("mps, idle neighbours", "mps", "latency_idle"),
        ("mps, busy neighbours", "mps", "latency_busy"),
        ("mps-shared, idle neighbours", "mps-shared", "latency_idle"),
        ("mps-shared, busy neighbours", "mps-shared", "latency_busy"),
        ("mps, one neighbour idle", "share", "latency_idle"),
        ("mps, one busy neighbour, every SM", "share", "latency_busy_uncapped"),
        ("mps, one busy neighbour, compute share", "share", "latency_busy_capped"),
    ]
    for label, phase, key in conditions:
        measured = phases.get(phase, {}).get(key)
        if measured:
            summary["latency"][label] = {
                "ttft_p50_ms": measured["ttft"].get("p50_ms"),
                "ttft_p90_ms": measured["ttft"].get("p90_ms"),
                "per_token_p50_ms": measured["per_token"].get("p50_ms"),
                "per_token_p90_ms": measured["per_token"].get("p90_ms"),
                "repeats": len(measured.get("repeats") or [1]),
                "ttft_p50_spread_ms": (measured.get("spread") or {}).get("ttft_p50_ms"),
                "per_token_p50_spread_ms": (measured.get("spread") or {}).get("per_token_p50_ms"),
            }
            load = measured.get("load") or {}
            if load.get("neighbour_tokens_per_second"):
                summary["latency"][label]["neighbour_tokens_per_second"] = load[
                    "neighbour_tokens_per_second"
                ]
    outside = []
    for phase in ("mps", "mps-shared", "alone"):
        for when, measured in phases.get(phase, {}).get("figures", {}).items():
            for row in measured["instances"]:
                outside.append(
                    (row["outside_budget_mib"], row["outside_grant_mib"], phase, when, row["name"])
                )
    if outside:
        worst = max(outside)
        summary["reserve"] = {
            "configured_mib": config.Settings().reserve_bytes // MI,
            "largest_use_outside_budget_mib": worst[0],
            "where": f"{worst[4]} ({worst[2]}, {worst[3]})",
            "largest_use_outside_grant_mib": max(o[1] for o in outside),
        }
    greedy = phases.get("mps", {}).get("refused_by_vllm", {})
    if "context_at_check_mib" in greedy:
        summary.setdefault("reserve", {})["context_at_check_mib"] = greedy["context_at_check_mib"]
    mps_figures = phases.get("mps", {}).get("figures", {}).get("ready")
    if mps_figures:
        summary["card"] = mps_figures["card"]
    throughput = {
        phase: {
            "isolation": entry.get("isolation"),
            "target_alone_tokens_per_second": entry["throughput"]["target_alone"][
                "tokens_per_second"
            ],
            "together_tokens_per_second": {
                name: row["tokens_per_second"]
                for name, row in entry["throughput"]["together"]["per_server"].items()
            },
            "share_of_alone_percent": entry["throughput"]["share_of_alone_percent"],
            "sum_of_alone_percent": entry["throughput"]["sum_of_alone_percent"],
        }
        for phase, entry in phases.items()
        if "throughput" in entry
    }
    if throughput:
        summary["throughput"] = throughput
    concurrent = _concurrent_summary(phases)
    if concurrent:
        summary["concurrent_starts"] = concurrent
    return summary


def _blocks(phase: Json) -> dict[str, int]:
    rows = phase.get("figures", {}).get("ready", {}).get("instances", [])
    return {r["name"]: int(r["num_gpu_blocks"]) for r in rows if r.get("num_gpu_blocks")}


def _concurrent_summary(phases: Json) -> list[Json]:
    """Each concurrent start against a sequential start of the same services (the phase
    ``sequential``, else ``mps``, else ``mps-shared``: each server's limit is its grant in all
    three): KV blocks per instance, the largest difference, failures, and the time until every
    server answered."""
    named = next((p for p in ("sequential", "mps", "mps-shared") if _blocks(phases.get(p, {}))), "")
    sequential = phases.get(named, {})
    reference = _blocks(sequential)
    out = []
    for name, phase in phases.items():
        if phase.get("start") != "concurrent":
            continue
        blocks = _blocks(phase)
        differences = {
            n: round(100 * (b - reference[n]) / reference[n], 2)
            for n, b in blocks.items()
            if reference.get(n)
        }
        out.append({
            "phase": name,
            "num_gpu_blocks": blocks,
            "sequential_phase": named or None,
            "sequential_num_gpu_blocks": {n: reference.get(n) for n in blocks},
            "difference_percent": differences,
            "largest_difference_percent": max(map(abs, differences.values()), default=None),
            "failed": sorted(phase.get("failed", {})),
            "all_ready_seconds": phase.get("all_ready_seconds"),
            "sequential_all_ready_seconds": sequential.get("all_ready_seconds"),
        })  # fmt: skip
    return out


def plot(data: Json, path: Path) -> None:
    """Per instance: grant, vLLM budget, NVML use; the card's capacity; latency by condition."""
    import matplotlib  # noqa: PLC0415 - only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    phases = data.get("phases", {})
    measured = phases.get("mps", {}).get("figures", {}).get("ready") or next(
        (p["figures"]["ready"] for p in phases.values() if p.get("figures", {}).get("ready")), None
    )
    if measured is None:
        return
    rows = measured["instances"]
    card = measured["card"]
    throughput = summarize(data).get("throughput", {})
    ratios = [3, 1.1, 2.4] + ([1.6] if throughput else [])
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(5.8 * sum(ratios) / 2.6, 5.6), gridspec_kw={"width_ratios": ratios}
    )
    ax = axes[0]
    xs = range(len(rows))
    width = 0.27
    series = [
        ("grant (MPS limit)", "grant_gib", "#9ecae1"),
        ("vLLM budget (utilization x CUDA total)", "vllm_budget_gib", "#3182bd"),
        ("NVML use", "nvml_used_gib", "#e6550d"),
    ]
    for k, (label, key, colour) in enumerate(series):
        values = [r[key] for r in rows]
        bars = ax.bar([x + (k - 1) * width for x in xs], values, width, label=label, color=colour)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value:.2f}",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(list(xs), [r["name"] for r in rows])
    ax.set_ylabel("GiB")
    ax.set_title("Per instance (isolation mps)")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax = axes[1]
    bottom = 0.0
    palette = ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#7f2704"]
    for row, colour in zip(rows, palette, strict=False):
        ax.bar(0, row["nvml_used_gib"], bottom=bottom, color=colour, edgecolor="white")
        ax.annotate(
            row["name"],
            (0, bottom + row["nvml_used_gib"] / 2),
            ha="center",
            va="center",
            fontsize=7,
            color="white",
        )
        bottom += row["nvml_used_gib"]
    other = max(card["used_gib"] - bottom, 0.0)
    ax.bar(0, other, bottom=bottom, color="#636363", label="other use (MPS servers, driver)")
    ax.bar(0, card["left_gib"], bottom=bottom + other, color="#e5f5e0", label="left")
    ax.axhline(card["cuda_total_gib"], color="black", lw=1)
    ax.axhline(card["sum_grants_gib"], color="#3182bd", ls="--", lw=1)
    ax.annotate(
        f"CUDA total {card['cuda_total_gib']:.2f} GiB",
        (0.5, card["cuda_total_gib"]),
        xycoords=("axes fraction", "data"),
        ha="center",
        va="bottom",
        fontsize=7,
    )
    ax.annotate(
        f"sum of grants {card['sum_grants_gib']:.2f} GiB",
        (0.5, card["sum_grants_gib"] + 1.5),
        xycoords=("axes fraction", "data"),
        ha="center",
        va="bottom",
        fontsize=7,
        color="#08519c",
    )
    ax.set_xticks([])
    ax.set_title(f"The card: {card['model']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02))
    ax = axes[2]
    summary = summarize(data)["latency"]
    labels = list(summary)
    ttft = [summary[k]["ttft_p50_ms"] or 0 for k in labels]
    tpot = [summary[k]["per_token_p50_ms"] or 0 for k in labels]

    def whisker(key: str) -> list[list[float]]:
        """Each condition's spread over its repeats (the p50 of each), else p50 to p90."""
        low, high = [], []
        for k in labels:
            mid = summary[k][f"{key}_p50_ms"] or 0
            spread = summary[k].get(f"{key}_p50_spread_ms")
            if spread:
                low.append(max(mid - spread[0], 0))
                high.append(max(spread[1] - mid, 0))
            else:
                low.append(0)
                high.append(max((summary[k][f"{key}_p90_ms"] or 0) - mid, 0))
        return [low, high]

    ttft_err, tpot_err = whisker("ttft"), whisker("per_token")
    ys = range(len(labels))
    ax.barh(
        [y - 0.2 for y in ys],
        ttft,
        0.4,
        xerr=ttft_err,
        capsize=2,
        label="time to first token (p50; whiskers: min-max over repeats)",
        color="#756bb1",
    )
    ax.barh(
        [y + 0.2 for y in ys],
        tpot,
        0.4,
        xerr=tpot_err,
        capsize=2,
        label="per output token (p50; whiskers: min-max over repeats)",
        color="#31a354",
    )
    for y, (a, b) in enumerate(zip(ttft, tpot, strict=True)):
        ax.annotate(f"{a:.1f}", (a, y - 0.2), va="center", fontsize=7)
        ax.annotate(f"{b:.1f}", (b, y + 0.2), va="center", fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(
        f"Latency of {data.get('options', {}).get('target', TARGET)}:"
        f" {data.get('options', {}).get('repeats', 1)} x"
        f" {data.get('options', {}).get('requests', '?')} streamed requests x"
        f" {data.get('options', {}).get('output_tokens', '?')} tokens"
    )
    ax.legend(fontsize=8, loc="lower right")
    if throughput:
        _plot_throughput(axes[3], data, throughput)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(ax: Any, data: Json, throughput: Json) -> None:
    """Per phase, each server's tokens/s with all decoding, as a share of the target alone;
    whiskers: the lowest and highest window."""
    labels, values, low, high = [], [], [], []
    for phase, row in throughput.items():
        together = data["phases"][phase]["throughput"]["together"]["per_server"]
        base = row["target_alone_tokens_per_second"] or 1
        for name, percent in row["share_of_alone_percent"].items():
            spread = together[name]["spread"]
            labels.append(f"{name} ({phase})")
            values.append(percent)
            low.append(max(percent - 100 * spread[0] / base, 0))
            high.append(max(100 * spread[1] / base - percent, 0))
    ys = range(len(labels))
    ax.barh(list(ys), values, 0.6, xerr=[low, high], capsize=2, color="#fd8d3c")
    for y, value in zip(ys, values, strict=True):
        ax.annotate(f"{value:.0f} %", (value, y), va="center", fontsize=7)
    ax.axvline(100, color="black", lw=1)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the target alone (tokens/s)")
    ax.set_title("Throughput, all decoding", fontsize=10)


def merge(files: Sequence[Path], out: Path) -> Json:
    """Join runs: a later run's phase replaces an earlier one's, which is kept under ``repeats``."""
    data: Json = {}
    runs: list[Json] = []
    repeats: list[Json] = []
    origin: dict[str, Json] = {}
    for path in files:
        part = json.loads(path.read_text())
        card = (part.get("machine", {}).get("cards") or [{}])[0].get("uuid")
        run = {
            "file": path.name,
            "started": part.get("started"),
            "card": card,
            "phases": list(part.get("phases", {})),
        }
        runs.append(run)
        for name, phase in data.get("phases", {}).items():
            if name in part.get("phases", {}):
                repeats.append(
                    {
                        "phase": name,
                        "card": origin[name]["card"],
                        "started": origin[name]["started"],
                        "data": phase,
                    }
                )
        origin.update(dict.fromkeys(part.get("phases", {}), run))
        phases = {**data.get("phases", {}), **part.get("phases", {})}
        steps = data.get("steps", []) + [f"[{path.name}] {s}" for s in part.get("steps", [])]
        data = {**data, **part, "phases": phases, "steps": steps}
    data["runs"] = runs
    data["repeats"] = repeats
    data["summary"] = summarize(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-proof.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out / "gpu-proof.png")
    return data
