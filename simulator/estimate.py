"""``gpushare estimate``: the GPU memory a vLLM server needs, and the annotation that asks for it.

vLLM's ``--gpu-memory-utilization`` budget holds the weights, the activation peak of its profile
run (plus memory outside torch's allocator), the CUDA graphs and the KV cache; the process's CUDA
context lies outside it, in the per-instance reserve. The grant to ask for is their sum, rounded
up to whole memory units::

    weights + KV cache + activations + CUDA graphs + reserve  ->  gpushare.io/gpu-memory

:func:`estimate` is the arithmetic (pure; the simulator sizes its trace with it); :func:`run` is
the command.
"""

import argparse
import dataclasses
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gpushare.core import config, errors, names, quantities
from gpushare.core.quantities import MI, format_bytes
from gpushare.simulator import models
from gpushare.simulator.models import ModelShape

DEFAULT_MAX_NUM_SEQS: Final = 8
"""Sequences one shared server runs at once. vLLM's own default (256, or 1024 on cards of 70 GiB
and more) follows the physical card and makes its sampler's profile peak alone several GiB; a
shared server should be given its concurrency explicitly."""

DEFAULT_MAX_NUM_BATCHED_TOKENS: Final = 8192
"""vLLM's default for its OpenAI server on cards of 70 GiB and more (2048 on smaller ones)."""

KV_BLOCK_TOKENS: Final = 16
"""vLLM allocates KV cache in blocks of 16 tokens: a sequence's length rounds up to a block."""

SAMPLER_BYTES_PER_LOGIT: Final = 40
"""Peak bytes per (sequence x vocabulary entry) of vLLM's sampler profile: float32 logits and about
nine temporaries as large (softmax, sort values and int64 indices, log-probabilities). vLLM logged
peaks of 4.76 GiB (Llama-3.1-8B), 5.56 GiB (Qwen3-0.6B) and 7.38 GiB (gpt-oss-20b) on an H100 at
1024 sequences: 38.5 bytes per logit each time; 40 keeps a margin."""

NON_TORCH_BYTES: Final = 160 * MI
"""Memory outside torch's allocator inside vLLM's budget (cuBLAS and attention workspaces):
0.13-0.14 GiB logged by vLLM on one H100, with margin. NCCL under tensor parallelism adds more."""

CUDA_GRAPH_BASE_BYTES: Final = 128 * MI
"""Fixed part of the CUDA-graph allowance. vLLM logged -0.45 to +0.39 GiB of graph memory for
0.6B to 20B models on an H100 (negative: graphs reused freed memory), 1.03 GiB for a 120B MoE."""

MAX_CUDA_GRAPH_BATCH: Final = 512
"""vLLM captures CUDA graphs for batches up to ``min(2 x max_num_seqs, 512)`` tokens."""

KV_CACHE_DTYPES: Final = {
    "auto": None,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
"""vLLM's ``--kv-cache-dtype`` values and their bytes per element (``auto``: the model's dtype)."""
GRAPHS_RESERVE_BYTES: Final = 1536 * quantities.MI
"""The reserve that let every server with CUDA graphs start (docs/gpu-proof.md, round two)."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The memory one vLLM server needs, by part, and the grant to ask for."""

    model: str
    parameters: int
    dtype: models.Dtype
    weight_format: str
    """``dtype`` or the quantization of the linear layers (``awq``, ``fp8``...)."""
    kv_cache_dtype: str
    """The KV cache's element type (``auto`` resolved to the model's dtype)."""
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_bytes_per_token: int
    kv_tokens: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    cuda_graph_bytes: int
    reserve_bytes: int
    total_bytes: int
    """The sum of the parts above."""
    unit_bytes: int
    request_bytes: int
    """``total_bytes`` rounded up to whole units: the grant to ask for."""
    minimum_bytes: int
    """The smallest grant vLLM starts in: KV cache for one full sequence, in whole units."""
    annotation: str
    """The line to paste into the metadata's annotations."""
    notes: tuple[str, ...]
    """How the estimate was made and where it can be off."""

    @property
    def quantity(self) -> str:
        """The request as a Kubernetes quantity (``26Gi``)."""
        return quantities.to_quantity(self.request_bytes)


def estimate(
    shape: ModelShape,
    *,
    reserve_bytes: int,
    unit_bytes: int,
    dtype: str | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    kv_tokens: int | None = None,
    enforce_eager: bool = False,
) -> Estimate:
    """Estimate what vLLM needs to serve ``shape`` with these flags.

    The KV cache holds ``max_num_seqs`` sequences of ``max_model_len`` tokens (none is ever
    preempted), or ``kv_tokens`` when given; never less than one full sequence, vLLM's own
    minimum. ``dtype`` and ``max_model_len`` default to the checkpoint's, as vLLM's do.
    """
    act_dtype = _dtype(shape, dtype)
    act_bytes = models.DTYPE_BYTES[act_dtype]
    fmt = models.parse_quantization(quantization) if quantization else shape.quantization
    kv_element = _kv_element_bytes(kv_cache_dtype, act_bytes)
    length = shape.max_position_embeddings if max_model_len is None else max_model_len
    if length is None:
        raise errors.BadRequest(
            f"{shape.name}: config.json has no max_position_embeddings: pass --max-model-len"
        )
    for flag, value in (
        ("--max-model-len", length),
        ("--max-num-seqs", max_num_seqs),
        ("--max-num-batched-tokens", max_num_batched_tokens),
    ):
        if value < 1:
            raise errors.BadRequest(f"{flag} must be at least 1, got {value}")

    params = shape.parameters()
    weights = _weights_bytes(shape, params, fmt, act_bytes=act_bytes, length=length)

    per_token = shape.kv_bytes_per_token(kv_element)
    sequence_tokens = math.ceil(length / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    worst_case = max_num_seqs * sequence_tokens
    if kv_tokens is not None and kv_tokens < length:
        raise errors.BadRequest(
            f"--kv-tokens {kv_tokens} is under one full sequence of {length} tokens, the least"
            " vLLM starts with: raise it or lower --max-model-len"
        )
    tokens = worst_case if kv_tokens is None else max(sequence_tokens, min(kv_tokens, worst_case))
    kv_cache = tokens * per_token

    # Activations: the larger of one forward pass over the batched tokens and the sampler's
    # logits for every sequence, plus memory outside torch's allocator.
    token_bytes = _token_activation_bytes(shape, act_bytes)
    forward = max_num_batched_tokens * token_bytes
    sampler = max_num_seqs * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT
    activation = max(forward, sampler) + NON_TORCH_BYTES

    graph_tokens = min(2 * max_num_seqs, MAX_CUDA_GRAPH_BATCH)
    graphs = 0 if enforce_eager else CUDA_GRAPH_BASE_BYTES + graph_tokens * token_bytes

    total = weights + kv_cache + activation + graphs + reserve_bytes
    request = quantities.to_units(total, unit_bytes) * unit_bytes
    least = total - kv_cache + sequence_tokens * per_token
    minimum = quantities.to_units(least, unit_bytes) * unit_bytes
    notes = _notes(
        shape,
        length=length,
        max_num_seqs=max_num_seqs,
        tokens=tokens,
        forward=forward,
        sampler=sampler,
        defaulted_length=max_model_len is None,
        graphs_reserve_short=not enforce_eager and reserve_bytes < GRAPHS_RESERVE_BYTES,
    )
    return Estimate(
        model=shape.name,
        parameters=params.total,
        dtype=act_dtype,
        weight_format=fmt.name if fmt else act_dtype,
        kv_cache_dtype=act_dtype if kv_cache_dtype.lower() == "auto" else kv_cache_dtype.lower(),
        max_model_len=length,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_bytes_per_token=per_token,
        kv_tokens=tokens,
        weights_bytes=weights,
        kv_cache_bytes=kv_cache,
        activation_bytes=activation,
        cuda_graph_bytes=graphs,
        reserve_bytes=reserve_bytes,
        total_bytes=total,
        unit_bytes=unit_bytes,
        request_bytes=request,
        minimum_bytes=minimum,
        annotation=f'{names.ANNOTATION_GPU_MEMORY}: "{quantities.to_quantity(request)}"',
        notes=notes,
    )


def _weights_bytes(
    shape: ModelShape,
    params: models.ParameterCount,
    fmt: models.WeightFormat | None,
    *,
    act_bytes: int,
    length: int,
) -> int:
    linear = fmt.bytes_for(params.linear) if fmt else params.linear * act_bytes
    dense = (params.total - params.linear) * act_bytes
    # vLLM keeps its rotary cos/sin table as a buffer: positions x head size, in the model dtype.
    rotary = (shape.max_position_embeddings or length) * shape.head_dim * act_bytes
    return linear + dense + rotary


def _token_activation_bytes(shape: ModelShape, act_bytes: int) -> int:
    """A layer's widest tensors per token: residual and hidden copies, q/k/v, the MLP's gate and
    up projections, their product and output."""
    return act_bytes * (
        4 * shape.hidden_size
        + (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        + 3 * shape.mlp_width
    )


def _dtype(shape: ModelShape, requested: str | None) -> models.Dtype:
    if requested and requested.lower() != "auto":
        return models.parse_dtype(requested)
    if shape.dtype is None or shape.dtype == "float32":
        return "bfloat16"  # vLLM's auto: float32 checkpoints run in 16 bits
    return shape.dtype


def _kv_element_bytes(kv_cache_dtype: str, act_bytes: int) -> int:
    try:
        size = KV_CACHE_DTYPES[kv_cache_dtype.lower()]
    except KeyError:
        raise errors.BadRequest(
            f"unknown --kv-cache-dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}"
        ) from None
    return act_bytes if size is None else size


def _notes(
    shape: ModelShape,
    *,
    length: int,
    max_num_seqs: int,
    tokens: int,
    forward: int,
    sampler: int,
    defaulted_length: bool,
    graphs_reserve_short: bool,
) -> tuple[str, ...]:
    notes = [
        f"KV cache for {tokens} tokens ({max_num_seqs} sequences of {length}, each rounded up to"
        f" {KV_BLOCK_TOKENS}-token blocks, or --kv-tokens): with shorter sequences more run at"
        " once; with less memory vLLM queues requests but still starts while one full sequence"
        " fits.",
        f"Activations: the larger of a forward pass ({format_bytes(forward)}) and the sampler of"
        f" {max_num_seqs} sequences ({format_bytes(sampler)}), plus"
        f" {format_bytes(NON_TORCH_BYTES)} outside torch; CUDA graphs:"
        f" {format_bytes(CUDA_GRAPH_BASE_BYTES)} plus the largest captured batch. Both are rules"
        " of thumb from vLLM's startup logs on an H100 and move by a few hundred MiB between"
        " vLLM versions.",
        "Pass vLLM the flags above: its defaults for --max-num-seqs and --max-num-batched-tokens"
        " follow the physical card, and at 1024 sequences the sampler alone wants"
        f" {format_bytes(1024 * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT)}.",
        "Not counted: tensor parallelism, LoRA adapters, speculative decoding, multimodal"
        " inputs, and layers outside the Llama layout.",
    ]
    if graphs_reserve_short:
        notes.insert(
            0,
            f"CUDA graphs are on (no --enforce-eager): vLLM's start-up needs more room outside"
            f" its budget than eager mode; measured on an H100 with an 8B model, servers under a"
            f" reserve of 716 MiB failed at start-up and under"
            f" {format_bytes(GRAPHS_RESERVE_BYTES)} all started. Set reserve_bytes to"
            f" {quantities.to_quantity(GRAPHS_RESERVE_BYTES)} in the cluster's configuration"
            f" and pass --reserve {quantities.to_quantity(GRAPHS_RESERVE_BYTES)} here.",
        )
    if defaulted_length:
        notes.insert(
            0,
            f"--max-model-len defaults to the model's {length} tokens, as in vLLM: pass a shorter"
            " one if requests are shorter, the KV cache shrinks with it.",
        )
    if shape.max_position_embeddings and length > shape.max_position_embeddings:
        notes.insert(
            0,
            f"--max-model-len {length} exceeds the model's {shape.max_position_embeddings}"
            " positions: vLLM refuses it unless the model's rope scaling extends them.",
        )
    return (*shape.notes, *notes)


# --- the command ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gpushare estimate``."""
    parser.add_argument(
        "model",
        metavar="CONFIG_JSON",
        help="a model's config.json, its folder, or a built-in shape: " + ", ".join(models.CATALOG),
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *models.DTYPE_NAMES),
        default="auto",
        help="vLLM's --dtype (default auto: the checkpoint's, 16 bits for float32)",
    )
    parser.add_argument(
        "--quantization",
        choices=tuple(models.QUANTIZATIONS),
        help="how the linear layers are stored (default: the checkpoint's quantization_config)",
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=tuple(KV_CACHE_DTYPES), default="auto", help="vLLM's flag"
    )
    parser.add_argument(
        "--max-model-len", type=_positive_int, help="default: the model's max_position_embeddings"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=DEFAULT_MAX_NUM_SEQS,
        help=f"sequences run at once (default {DEFAULT_MAX_NUM_SEQS})",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
        help=f"tokens of one forward pass (default {DEFAULT_MAX_NUM_BATCHED_TOKENS})",
    )
    parser.add_argument(
        "--kv-tokens",
        type=_positive_int,
        help="size the KV cache for this many tokens instead of max-num-seqs full sequences",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="vLLM runs without CUDA graphs"
    )
    parser.add_argument("--unit", help="memory unit (default: the configuration's unit_bytes)")
    parser.add_argument("--reserve", help="per-instance reserve (default: reserve_bytes)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the estimate for one model."""
    settings = config.load(overrides={"unit_bytes": args.unit, "reserve_bytes": args.reserve})
    shape = _shape(args.model)
    result = estimate(
        shape,
        reserve_bytes=settings.reserve_bytes,
        unit_bytes=settings.unit_bytes,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_tokens=args.kv_tokens,
        enforce_eager=args.enforce_eager,
    )
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "quantity": result.quantity}, indent=2))
    else:
        print(render(result))
    return 0


def _shape(model: str) -> ModelShape:
    path = Path(model)
    if not path.exists() and model in models.CATALOG:
        return models.CATALOG[model]
    if not path.exists():
        raise errors.BadRequest(
            f"no such file or folder: {model} (nor a built-in shape: {', '.join(models.CATALOG)})"
        )
    return models.load(path)


def _size(n: int) -> str:
    return f"{n / quantities.GI:.2f} GiB" if n >= quantities.GI else f"{n / MI:.0f} MiB"


def render(result: Estimate) -> str:
    """The estimate for people: the parts, the annotation to paste, the flags, the caveats."""
    graphs = "graph pool of the captured batches" if result.cuda_graph_bytes else "none (eager)"
    rows = [
        (
            "weights",
            result.weights_bytes,
            f"{result.parameters / 1e9:.2f} billion parameters, {result.weight_format}",
        ),
        (
            "KV cache",
            result.kv_cache_bytes,
            f"{result.kv_tokens} tokens x {format_bytes(result.kv_bytes_per_token)} per token"
            f" ({result.kv_cache_dtype})",
        ),
        ("activations", result.activation_bytes, "profile peak and memory outside torch"),
        ("CUDA graphs", result.cuda_graph_bytes, graphs),
        ("reserve", result.reserve_bytes, "per-instance CUDA context, outside vLLM's budget"),
        ("total", result.total_bytes, ""),
    ]
    lines = [f"gpushare estimate for {result.model}", ""]
    lines += [f"  {name:<12} {_size(size):>10}  {why}".rstrip() for name, size, why in rows]
    unit = format_bytes(result.unit_bytes)
    lines += [
        f"  {'ask for':<12} {result.quantity:>10}  the total in whole units of {unit}",
        "",
        "Paste into the InferenceService (or Pod) metadata:",
        "",
        "    annotations:",
        f"      {result.annotation}",
        "",
        "Run vLLM with the flags this estimate assumed:",
        "",
        f"    --max-model-len {result.max_model_len} --max-num-seqs {result.max_num_seqs}"
        f" --max-num-batched-tokens {result.max_num_batched_tokens}",
        "",
        f"vLLM starts in as little as {quantities.to_quantity(result.minimum_bytes)} (KV cache"
        f" for one {result.max_model_len}-token sequence).",
        "",
        "How this was estimated, and where it can be off:",
    ]
    for note in result.notes:
        lines += textwrap.wrap(
            note, width=98, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False
        )
    return "\n".join(lines)
