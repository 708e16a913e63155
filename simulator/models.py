"""Model shapes: the few numbers of a Hugging Face ``config.json`` that size a vLLM server.

:func:`from_config` reads decoder-only transformers in the Llama layout (Llama, Mistral, Qwen2/3,
Mixtral and Qwen MoE, and the text half of multimodal configs). Architectures whose memory does
not follow that layout (latent attention, state-space or linear-attention layers) are refused
rather than misjudged. :data:`CATALOG` holds the shapes of well-known public models.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from gpushare.core import errors

Dtype = Literal["bfloat16", "float16", "float32"]

DTYPE_BYTES: Final[Mapping[Dtype, int]] = {"bfloat16": 2, "float16": 2, "float32": 4}

DTYPE_NAMES: Final[Mapping[str, Dtype]] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
"""Spellings of a dtype accepted on the command line and in ``config.json``."""


def parse_dtype(name: str) -> Dtype:
    """A dtype from any accepted spelling; :class:`BadRequest` names the accepted ones."""
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise errors.BadRequest(
            f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}"
        ) from None


@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How the decoder's linear layers are stored when quantized.

    Each group of ``group_size`` weights carries ``group_bits`` of scale and zero point (AWQ and
    GPTQ: a 16-bit scale and a ``bits``-wide zero per 128 weights); ``None`` means one scale per
    channel or tensor, too small to count.
    """

    name: str
    bits: int
    group_size: int | None = None
    group_bits: int = 0

    def bytes_for(self, weights: int) -> int:
        """Bytes of ``weights`` linear-layer weights in this format."""
        groups = 0 if self.group_size is None else math.ceil(weights / self.group_size)
        return math.ceil((weights * self.bits + groups * self.group_bits) / 8)


def _grouped(name: str, bits: int, group_size: int | None) -> WeightFormat:
    if group_size is None:
        return WeightFormat(name, bits)
    return WeightFormat(name, bits, group_size, 16 + bits)


QUANTIZATIONS: Final[Mapping[str, WeightFormat]] = {
    "fp8": WeightFormat("fp8", 8),
    "int8": WeightFormat("int8", 8),
    "int4": _grouped("int4", 4, 128),
    "awq": _grouped("awq", 4, 128),
    "awq_marlin": _grouped("awq", 4, 128),
    "gptq": _grouped("gptq", 4, 128),
    "gptq_marlin": _grouped("gptq", 4, 128),
}
"""``--quantization`` names (vLLM's where they exist): 8-bit weights, or 4-bit in groups of 128."""


def parse_quantization(name: str) -> WeightFormat:
    """A weight format by name; :class:`BadRequest` names the known ones."""
    try:
        return QUANTIZATIONS[name.lower()]
    except KeyError:
        raise errors.BadRequest(
            f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATIONS)}"
        ) from None


@dataclass(frozen=True, slots=True)
class ParameterCount:
    """Parameters by how they are stored: linear layers may be quantized, the rest is not."""

    linear: int
    """Attention and MLP (or expert) projections of every layer."""
    embedding: int
    lm_head: int
    """Zero when tied to the embedding."""
    other: int
    """Norms, biases and MoE routers."""

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.other


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What sizes a decoder: layers, widths, heads, vocabulary, and how weights are stored."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """The dense MLP's width (unused by layers that are all experts)."""
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    dtype: Dtype | None = None
    """``torch_dtype`` of the checkpoint, which vLLM's ``--dtype auto`` follows."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0
    """Routed experts per layer; 0 for a dense model."""
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    quantization: WeightFormat | None = None
    """The checkpoint's own quantization (``quantization_config``)."""
    notes: tuple[str, ...] = ()
    """What this shape leaves out, for the estimate's caveats."""

    @property
    def mlp_width(self) -> int:
        """Intermediate width one token passes through per layer (its experts for MoE)."""
        if self.num_experts:
            return (
                self.experts_per_token * self.expert_intermediate_size
                + self.shared_expert_intermediate_size
            )
        return self.intermediate_size

    def parameters(self) -> ParameterCount:
        """Count the parameters from the shape."""
        h = self.hidden_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        biases = (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        if self.num_experts:
            experts = self.num_experts * 3 * h * self.expert_intermediate_size
            shared = 3 * h * self.shared_expert_intermediate_size
            mlp = experts + shared
            router = h * self.num_experts + (h if self.shared_expert_intermediate_size else 0)
        else:
            mlp = 3 * h * self.intermediate_size
            router = 0
            biases += 2 * self.intermediate_size + h if self.mlp_bias else 0
        norms = 2 * h
        embedding = self.vocab_size * h
        return ParameterCount(
            linear=self.num_layers * (attention + mlp),
            embedding=embedding,
            lm_head=0 if self.tie_word_embeddings else embedding,
            other=self.num_layers * (biases + router + norms) + h,
        )

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """KV cache per token: layers x KV heads x head size x 2 (K and V) x element bytes."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * element_bytes


_REQUIRED: Final = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)

_UNSUPPORTED: Final = {
    "kv_lora_rank": "multi-head latent attention (DeepSeek-style)",
    "ssm_cfg": "state-space (Mamba) layers",
    "mamba_d_state": "state-space (Mamba) layers",
    "linear_attn_config": "linear-attention layers",
}

_QKV_BIAS_TYPES: Final = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"})
"""Architectures whose q, k and v projections carry a bias without saying so in the config."""


def from_config(raw: Mapping[str, Any], *, name: str = "model") -> ModelShape:
    """Read a ``config.json`` mapping; :class:`BadRequest` names what is missing or unusable."""
    notes: list[str] = []
    config: Mapping[str, Any] = raw
    text_config = raw.get("text_config")
    if isinstance(text_config, Mapping):
        config = {**raw, **text_config}
        notes.append("a multimodal model: only its language model is counted, not its encoder")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) is not None:
            raise errors.BadRequest(
                f"{name}: {what} ({key}) is not modelled by gpushare estimate; measure the server"
                " once and write its memory in the annotation"
            )
    layer_types = config.get("layer_types") or ()
    odd_layers = sorted(
        {str(t) for t in layer_types} - {"full_attention", "sliding_attention", "attention"}
    )
    if odd_layers:
        raise errors.BadRequest(
            f"{name}: layer types {', '.join(odd_layers)} are not modelled by gpushare estimate"
        )
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise errors.BadRequest(
            f"{name}: config.json lacks {', '.join(missing)}; gpushare estimate reads decoder"
            " configs in the Hugging Face layout (Llama, Mistral, Qwen, Mixtral)"
        )
    hidden = _required(config, "hidden_size", name)
    heads = _required(config, "num_attention_heads", name)
    head_dim = _optional(config, "head_dim", name)
    if head_dim is None:
        if hidden % heads:
            raise errors.BadRequest(
                f"{name}: hidden_size {hidden} is not a multiple of num_attention_heads {heads},"
                " and no head_dim is given"
            )
        head_dim = hidden // heads
    intermediate = _required(config, "intermediate_size", name)
    experts = (
        _optional(config, "num_local_experts", name) or _optional(config, "num_experts", name) or 0
    )
    if experts:
        notes.append("a mixture of experts: every expert's weights count, its activations roughly")
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        notes.append(
            "sliding-window attention: the KV cache is counted as if every layer attended to the"
            " whole context, so this estimate is high"
        )
    model_type = str(config.get("model_type") or "unknown")
    return ModelShape(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=_required(config, "num_hidden_layers", name),
        num_heads=heads,
        num_kv_heads=_optional(config, "num_key_value_heads", name) or heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=_required(config, "vocab_size", name),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=_optional(config, "max_position_embeddings", name),
        dtype=_checkpoint_dtype(config, notes),
        qkv_bias=bool(config.get("attention_bias", model_type in _QKV_BIAS_TYPES)),
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        num_experts=experts,
        experts_per_token=(_optional(config, "num_experts_per_tok", name) or 2) if experts else 0,
        expert_intermediate_size=(
            (_optional(config, "moe_intermediate_size", name) or intermediate) if experts else 0
        ),
        shared_expert_intermediate_size=(
            _optional(config, "shared_expert_intermediate_size", name) or 0
        ),
        quantization=_checkpoint_quantization(config.get("quantization_config"), name),
        notes=tuple(notes),
    )


def load(path: Path) -> ModelShape:
    """Read ``config.json``, or the one in a model folder."""
    file = path / "config.json" if path.is_dir() else path
    try:
        text = file.read_text()
    except FileNotFoundError:
        where = f"{path} holds no config.json" if path.is_dir() else f"no such file: {path}"
        raise errors.BadRequest(where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.BadRequest(f"cannot read {file}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.BadRequest(f"{file} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise errors.BadRequest(f"{file} is not a JSON object")
    return from_config(raw, name=path.name if path.is_dir() else str(file))


def _optional(config: Mapping[str, Any], key: str, name: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise errors.BadRequest(f"{name}: {key} must be a positive whole number, got {value!r}")
    return value


def _required(config: Mapping[str, Any], key: str, name: str) -> int:
    value = _optional(config, key, name)
    if value is None:
        raise errors.BadRequest(f"{name}: config.json lacks {key}")
    return value


def _checkpoint_dtype(config: Mapping[str, Any], notes: list[str]) -> Dtype | None:
    value = config.get("torch_dtype") or config.get("dtype")
    if value is None:
        return None
    dtype = DTYPE_NAMES.get(str(value).lower())
    if dtype is None:
        notes.append(f"the checkpoint's dtype {value!r} is unknown here: 2 bytes assumed")
    return dtype


def _checkpoint_quantization(config: object, name: str) -> WeightFormat | None:
    if not isinstance(config, Mapping):
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "fp8":
        return QUANTIZATIONS["fp8"]
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = config.get("bits", config.get("w_bit", 4))
        group = config.get("group_size", config.get("q_group_size", 128))
        size = None if group in (None, -1) else int(group)
        return _grouped(method.removesuffix("_marlin"), int(bits), size)
    if method == "compressed-tensors":
        for group in (config.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            bits = int(weights.get("num_bits", 8))
            size = weights.get("group_size")
            return _grouped(f"compressed-tensors w{bits}", bits, int(size) if size else None)
    if method == "mxfp4":
        return WeightFormat("mxfp4", 4, 32, 8)
    if method == "bitsandbytes":
        if config.get("load_in_4bit"):
            return WeightFormat("bitsandbytes 4-bit", 4, 64, 32)
        return WeightFormat("bitsandbytes 8-bit", 8)
    raise errors.BadRequest(
        f"{name}: quantization_config.quant_method {method or None!r} is not one gpushare"
        f" estimate knows; pass --quantization ({', '.join(QUANTIZATIONS)}) to say how its"
        " weights are stored"
    )


# Shapes from each model's published config.json (Hugging Face hub): name, model_type, hidden
# size, layers, attention heads, KV heads, head size, MLP width, vocabulary, tied embeddings, and
# max_position_embeddings.
_PUBLISHED: Final = (
    ("Qwen2.5-0.5B", "qwen2", 896, 24, 14, 2, 64, 4864, 151936, True, 32768),
    ("Qwen2.5-1.5B", "qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True, 32768),
    ("Qwen2.5-3B", "qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True, 32768),
    ("Qwen2.5-7B", "qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 32768),
    ("Qwen2.5-14B", "qwen2", 5120, 48, 40, 8, 128, 13824, 152064, False, 32768),
    ("Qwen2.5-32B", "qwen2", 5120, 64, 40, 8, 128, 27648, 152064, False, 32768),
    ("Qwen2.5-72B", "qwen2", 8192, 80, 64, 8, 128, 29568, 152064, False, 32768),
    ("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072),
    ("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 128, 8192, 128256, True, 131072),
    ("Llama-3.1-8B", "llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 131072),
    ("Llama-3.1-70B", "llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 131072),
    ("Mistral-7B-v0.3", "mistral", 4096, 32, 32, 8, 128, 14336, 32768, False, 32768),
)

CATALOG: Final[Mapping[str, ModelShape]] = {
    name: from_config(
        {
            "model_type": model_type,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "intermediate_size": mlp,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "max_position_embeddings": context,
            "torch_dtype": "bfloat16",
        },
        name=name,
    )
    for name, model_type, hidden, layers, heads, kv_heads, head_dim, mlp, vocab, tied, context in (
        _PUBLISHED
    )
}
"""Well-known public model shapes by name (bf16 checkpoints), for traces and quick estimates."""
