"""A stand-in for vLLM's OpenAI server, started exactly as vLLM is.

    python -m vllm.entrypoints.openai.api_server --port 8000 --gpu-memory-utilization 0.25 ...

with this folder's parent on ``PYTHONPATH``. It lets ``benchmarks/gpu_proof.py`` be proven without
vLLM: it takes vLLM's flags (``--gpu-memory-utilization`` in each spelling, the last one winning,
0.92 by default; unknown flags ignored) and serves ``/health``, ``/v1/models``, ``/metrics`` (with
``vllm:cache_config_info``) and ``/v1/completions`` (streamed or not, one chunk per token).

Memory, as vLLM does it: with CUDA (torch) it creates its context, refuses to start when the free
memory it sees is under ``utilization x total`` (vLLM's own message), then holds that budget in one
allocation and runs a small product per generated token. Without CUDA (a dry run on a CPU) the
free memory it sees is its MPS limit less a context of 512 MiB (the daemon's default, written by
the stand-in control program into its pipe directory, or ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``),
and it writes its use into ``FAKE_VLLM_STATE_DIR/<pid>.json`` for the dry run's NVML.
"""

import argparse
import asyncio
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

GI = 1 << 30
MI = 1 << 20
CONTEXT_BYTES = 512 * MI
TOKEN_SECONDS = 0.002
BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 2 * 16 * 8 * 64 * 2
"""K and V, 16 layers, 8 KV heads of 64, bf16: the model ``make_model.py`` writes."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="model")
    parser.add_argument("--served-model-name", "--served_model_name", default=None)
    parser.add_argument(
        "--gpu-memory-utilization", "--gpu_memory_utilization", type=float, default=0.92
    )
    args, _ = parser.parse_known_args(argv)
    return args


def _limit_bytes() -> int | None:
    limits = []
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    if pipe:
        try:
            lines = (Path(pipe) / "commands").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            match = re.match(r"^set_default_device_pinned_mem_limit\s+\S+\s+(\d+)([MG])$", line)
            if match:
                limits.append(int(match[1]) * (GI if match[2] == "G" else MI))
    text = os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "")
    for entry in filter(None, text.split(",")):
        amount = entry.rpartition("=")[2]
        scale = {"M": MI, "G": GI}.get(amount[-1:].upper(), 1)
        limits.append(int(float(amount.rstrip("MGmg")) * scale))
    return min(limits) if limits else None


class Memory:
    """The budget, held on the GPU or reported to the dry run."""

    def __init__(self, utilization: float) -> None:
        self.utilization = utilization
        self.torch: Any = None
        self.held: Any = None
        self.work: Any = None
        try:
            torch = importlib.import_module("torch")  # the GPU machine has it, a CPU test not
        except ImportError:
            return
        if torch.cuda.is_available():
            self.torch = torch

    def claim(self) -> int:
        """Check free memory as vLLM does, then hold the budget; returns the budget in bytes."""
        if self.torch is not None:
            torch = self.torch
            torch.cuda.init()
            torch.empty(1, device="cuda")
            free, total = torch.cuda.mem_get_info()
        else:
            total = int(os.environ["FAKE_VLLM_CUDA_TOTAL"])
            limit = _limit_bytes()
            free = (total if limit is None else min(total, limit)) - CONTEXT_BYTES
        wanted = int(self.utilization * total)
        if free < wanted:
            raise ValueError(
                f"Free memory on device cuda:0 ({free / GI:.2f}/{total / GI:.2f} GiB) on startup"
                f" is less than desired GPU memory utilization ({self.utilization},"
                f" {wanted / GI:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory"
                " used by other processes."
            )
        if self.torch is not None:
            torch = self.torch
            self.held = torch.empty(wanted - 64 * MI, dtype=torch.uint8, device="cuda")
            self.work = torch.ones(2048, 2048, dtype=torch.bfloat16, device="cuda")
            torch.cuda.synchronize()
        else:
            state = Path(os.environ["FAKE_VLLM_STATE_DIR"])
            card = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            used = wanted + 200 * MI
            (state / f"{os.getpid()}.json").write_text(json.dumps({"card": card, "used": used}))
        return wanted

    def step(self) -> None:
        """One decoding step's worth of GPU work."""
        if self.torch is not None:
            (self.work @ self.work).sum().item()


def app(args: argparse.Namespace, memory: Memory, budget: int) -> web.Application:
    name = args.served_model_name or args.model
    blocks = budget // 2 // (KV_BYTES_PER_TOKEN * BLOCK_SIZE)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        labels = (
            f'block_size="{BLOCK_SIZE}",cache_dtype="auto",'
            f'gpu_memory_utilization="{args.gpu_memory_utilization}",num_gpu_blocks="{blocks}"'
        )
        text = (
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f"vllm:cache_config_info{{{labels}}} 1.0\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = int(body.get("max_tokens") or 16)
        created = int(time.time())
        if not body.get("stream"):
            for _ in range(tokens):
                memory.step()
                await asyncio.sleep(TOKEN_SECONDS)
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "text": " x" * tokens, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": tokens},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(tokens):
            memory.step()
            await asyncio.sleep(TOKEN_SECONDS)
            chunk = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "text": " x",
                        "finish_reason": "length" if i == tokens - 1 else None,
                    }
                ],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": tokens + 4}
        final = {"id": "cmpl-fake", "choices": [], "usage": usage}
        await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        return response

    application = web.Application()
    application.router.add_get("/health", health)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/metrics", metrics)
    application.router.add_post("/v1/completions", completions)
    return application


def main() -> int:
    args = parse(sys.argv[1:])
    print(f"INFO fake vLLM: args {sys.argv[1:]}", flush=True)
    memory = Memory(args.gpu_memory_utilization)
    try:
        budget = memory.claim()
    except ValueError as exc:
        print(f"ValueError: {exc}", flush=True)
        return 1
    print(f"INFO GPU KV cache size: {budget // 2 // KV_BYTES_PER_TOKEN} tokens", flush=True)
    web.run_app(app(args, memory, budget), host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
