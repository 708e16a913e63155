"""The GPU proof's command line (see :mod:`benchmarks.gpuproof`)."""

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from benchmarks.gpuproof.common import FAKE_VLLM, INSTANCES, TARGET, Options
from benchmarks.gpuproof.phases import run
from benchmarks.gpuproof.report import merge, plot
from gpushare.deviceplugin import mps


def _instances(parser: argparse.ArgumentParser, text: str) -> tuple[tuple[str, int], ...]:
    pairs = []
    for item in text.split(","):
        name, _, gib = item.partition(":")
        if not name or not gib.isdigit():
            parser.error(f"--instances {text!r}: write NAME:GiB,... such as llm-a:24,llm-b:24")
        pairs.append((name, int(gib)))
    return tuple(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNG")
    parser.add_argument("--phases", default="alone,mps,mps-shared")
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: fake NVML, stand-in MPS control and vLLM"
    )
    parser.add_argument(
        "--fake-server",
        action="store_true",
        help="start the vLLM stand-in instead of vLLM (implied by --dry-run)",
    )
    parser.add_argument("--model", default="/tmp/model")
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter that runs the containers' python3"
    )
    parser.add_argument(
        "--server-pythonpath",
        default=os.environ.get("SERVER_PYTHONPATH", ""),
        help="PYTHONPATH of the servers (where vLLM lives)",
    )
    parser.add_argument("--mps-control", default=mps.CONTROL)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--busy-streams", type=int, default=8)
    parser.add_argument(
        "--no-eager",
        action="store_true",
        help="let vLLM compile and capture CUDA graphs (slower start)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds after which no new step starts (0: none)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="latency runs per condition (default 3)"
    )
    parser.add_argument(
        "--instances",
        default=",".join(f"{n}:{g}" for n, g in INSTANCES),
        help="the services packed on the card, NAME:GiB,... (default the four of 10-24 GiB)",
    )
    parser.add_argument("--target", default=TARGET, help="the service whose latency is measured")
    parser.add_argument(
        "--share", type=int, default=30, help="the neighbour's compute share in the share phase"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--reserve", default="", help="reserve_bytes of the configuration, e.g. 1536Mi"
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=10.0,
        help="each throughput window, one per repeat (0: no throughput)",
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these runs' JSON into --out")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of this JSON into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return 0
    if args.plot:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(json.loads(args.plot.read_text()), args.out / "gpu-proof.png")
        return 0
    fake = args.fake_server or args.dry_run
    pythonpath = str(FAKE_VLLM) if fake else args.server_pythonpath
    opts = Options(
        out=args.out,
        phases=tuple(p for p in args.phases.split(",") if p),
        dry_run=args.dry_run,
        fake_server=fake,
        model=args.model,
        python=args.python,
        server_pythonpath=pythonpath,
        mps_control=args.mps_control,
        requests=args.requests,
        tokens=args.tokens,
        busy_streams=args.busy_streams,
        eager=not args.no_eager,
        deadline=time.monotonic() + args.deadline if args.deadline > 0 else math.inf,
        repeats=args.repeats,
        instances=_instances(parser, args.instances),
        target=args.target,
        share=args.share,
        max_model_len=args.max_model_len,
        reserve=args.reserve,
        throughput_seconds=args.throughput_seconds,
    )
    unknown = {
        p
        for p in opts.phases
        if p not in ("alone", "sequential", "mps", "mps-shared", "share", "concurrent")
        and not re.fullmatch(r"concurrent(-none|-shared)?(-\d+)?", p)
    }
    if unknown:
        parser.error(
            f"unknown phases {sorted(unknown)}: use alone, sequential, mps, mps-shared, share,"
            " concurrent[-none|-shared][-N]"
        )
    data = asyncio.run(run(opts))
    print(json.dumps(data.get("summary", {}), indent=1))
    return 0 if all("error" not in p for p in data.get("phases", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
