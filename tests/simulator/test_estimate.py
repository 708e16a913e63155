"""``gpushare estimate``: hand-computed figures for two public model shapes, and bad input."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushare import cli
from gpushare.core import errors
from gpushare.core.quantities import GI, MI
from gpushare.simulator import estimate, models

RESERVE = 716 * MI  # the configuration's default per-instance reserve: 750,780,416 bytes

# meta-llama/Meta-Llama-3-8B's config.json (the keys that matter).
LLAMA_3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
}

# Qwen/Qwen2.5-0.5B's config.json (the keys that matter; q/k/v carry biases in Qwen2).
QWEN_25_05B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def test_llama_3_8b_parameters_by_hand() -> None:
    # embedding 128256 x 4096                          =   525,336,576
    # per layer: q 4096x4096 + k, v 4096x1024 each + o 4096x4096
    #            = 16,777,216 + 2 x 4,194,304 + 16,777,216 =  41,943,040
    #            MLP gate, up, down 3 x 4096 x 14336       = 176,160,768
    #            two RMSNorms 2 x 4096                     =       8,192
    #            = 218,112,000, x 32 layers              = 6,979,584,000
    # final norm 4096; lm_head (not tied) 525,336,576
    # total = 2 x 525,336,576 + 6,979,584,000 + 4,096    = 8,030,261,248
    count = models.from_config(LLAMA_3_8B).parameters()
    assert count.embedding == count.lm_head == 525_336_576
    assert count.linear == 32 * (41_943_040 + 176_160_768)
    assert count.total == 8_030_261_248


def test_qwen_2_5_0_5b_parameters_by_hand() -> None:
    # embedding 151936 x 896 (tied: no lm_head)        =   136,134,656
    # per layer: q 896x896 + k, v 896x128 each + o 896x896 =   1,835,008
    #            q, k, v biases 896 + 128 + 128            =       1,152
    #            MLP 3 x 896 x 4864                        =  13,074,432
    #            two RMSNorms 2 x 896                      =       1,792
    #            = 14,912,384, x 24 layers               =   357,897,216
    # final norm 896
    # total = 136,134,656 + 357,897,216 + 896           =   494,032,768
    count = models.from_config(QWEN_25_05B).parameters()
    assert count.lm_head == 0
    assert count.total == 494_032_768


def test_llama_3_8b_estimate_by_hand() -> None:
    # bf16, max_model_len 8192 (the config's), 8 sequences, 8192 batched tokens:
    # weights   8,030,261,248 x 2 bytes                       = 16,060,522,496
    #           + rotary table 8192 positions x 128 x 2      =      2,097,152
    #                                                         = 16,062,619,648
    # KV/token  32 layers x 8 KV heads x 128 x 2 (K, V) x 2   =        131,072
    # KV cache  8 x 8192 tokens x 131,072                     =  8,589,934,592 (8 GiB)
    # per-token activation 2 x (4x4096 + (32+2x8)x128 + 3x14336) = 131,072
    # forward   8192 x 131,072 = 1,073,741,824; sampler 8 x 128256 x 40 = 41,041,920
    # activations 1,073,741,824 + 160 MiB (167,772,160)       =  1,241,513,984
    # CUDA graphs 128 MiB + min(2x8, 512) x 131,072 = 134,217,728 + 2,097,152 = 136,314,880
    # reserve   716 MiB                                       =    750,780,416
    # total                                                   = 26,781,163,520 (24.94 GiB)
    # ask for   25 GiB; minimum: total - KV + 8192 x 131,072 = 19,264,970,752 -> 18 GiB
    result = estimate.estimate(
        models.from_config(LLAMA_3_8B, name="llama-3-8b"), reserve_bytes=RESERVE, unit_bytes=GI
    )
    assert result.parameters == 8_030_261_248
    assert result.weights_bytes == 16_062_619_648
    assert result.kv_bytes_per_token == 131_072
    assert result.kv_tokens == 65_536
    assert result.kv_cache_bytes == 8_589_934_592
    assert result.activation_bytes == 1_241_513_984
    assert result.cuda_graph_bytes == 136_314_880
    assert result.reserve_bytes == 750_780_416
    assert result.total_bytes == 26_781_163_520
    assert result.request_bytes == 25 * GI
    assert result.minimum_bytes == 18 * GI
    assert result.annotation == 'gpushare.io/gpu-memory: "25Gi"'
    assert result.max_model_len == 8192
    assert result.kv_cache_dtype == "bfloat16"


def test_qwen_2_5_0_5b_estimate_by_hand() -> None:
    # bf16, --max-model-len 4096 --max-num-seqs 16 --max-num-batched-tokens 2048:
    # weights   494,032,768 x 2                               =    988,065,536
    #           + rotary table 32768 positions x 64 x 2      =      4,194,304
    #                                                         =    992,259,840
    # KV/token  24 layers x 2 KV heads x 64 x 2 (K, V) x 2    =         12,288
    # KV cache  16 x 4096 tokens x 12,288                     =    805,306,368 (768 MiB)
    # per-token activation 2 x (4x896 + (14+2x2)x64 + 3x4864) = 38,656
    # forward   2048 x 38,656 = 79,167,488; sampler 16 x 151936 x 40 = 97,239,040 (larger)
    # activations 97,239,040 + 167,772,160                    =    265,011,200
    # CUDA graphs 134,217,728 + min(32, 512) x 38,656         =    135,454,720
    # reserve                                                 =    750,780,416
    # total                                                   =  2,948,812,544 (2.75 GiB)
    # ask for   3 GiB in 1 GiB units; in 256 MiB units 11 x 268,435,456 = 2,952,790,016 (2816Mi)
    # minimum   total - KV + 4096 x 12,288 = 2,193,837,824: 3 GiB, or 9 x 256 MiB (2304Mi)
    shape = models.from_config(QWEN_25_05B, name="qwen2.5-0.5b")
    flags: dict[str, Any] = {
        "max_model_len": 4096,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 2048,
    }
    result = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, **flags)
    assert result.weights_bytes == 992_259_840
    assert result.kv_bytes_per_token == 12_288
    assert result.kv_cache_bytes == 805_306_368
    assert result.activation_bytes == 265_011_200
    assert result.cuda_graph_bytes == 135_454_720
    assert result.total_bytes == 2_948_812_544
    assert result.request_bytes == 3 * GI
    assert result.annotation == 'gpushare.io/gpu-memory: "3Gi"'
    fine = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=256 * MI, **flags)
    assert fine.request_bytes == 2_952_790_016
    assert fine.annotation == 'gpushare.io/gpu-memory: "2816Mi"'
    assert fine.minimum_bytes == 2304 * MI
    assert not any("sliding" in note for note in result.notes)  # use_sliding_window is false


@pytest.mark.parametrize(
    ("quantization", "weights"),
    [
        # linear weights: 32 x 218,103,808 = 6,979,321,856; the rest 1,050,939,392 x 2 bytes
        # = 2,101,878,784 stays in bf16; rotary table 2,097,152.
        # fp8: 6,979,321,856 x 1 byte                                     -> 9,083,297,792
        ("fp8", 6_979_321_856 + 2_101_878_784 + 2_097_152),
        # awq: 4 bits, and per group of 128 a 16-bit scale and a 4-bit zero:
        # (6,979,321,856 x 4 + 54,525,952 groups x 20) / 8 = 3,625,975,808 -> 5,729,951,744
        ("awq", 3_625_975_808 + 2_101_878_784 + 2_097_152),
    ],
    ids=["fp8", "awq"],
)
def test_quantized_weights_by_hand(quantization: str, weights: int) -> None:
    result = estimate.estimate(
        models.from_config(LLAMA_3_8B),
        reserve_bytes=RESERVE,
        unit_bytes=GI,
        quantization=quantization,
    )
    assert result.weights_bytes == weights
    assert result.weight_format == quantization
    assert result.kv_cache_dtype == "bfloat16"  # quantized weights keep a 16-bit KV cache


def test_checkpoint_quantization_is_read_from_the_config() -> None:
    awq = {
        **LLAMA_3_8B,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
    }
    assert estimate.estimate(
        models.from_config(awq), reserve_bytes=RESERVE, unit_bytes=GI
    ).weights_bytes == (3_625_975_808 + 2_101_878_784 + 2_097_152)


def test_fp8_kv_cache_halves_it() -> None:
    result = estimate.estimate(
        models.from_config(LLAMA_3_8B), reserve_bytes=RESERVE, unit_bytes=GI, kv_cache_dtype="fp8"
    )
    assert result.kv_bytes_per_token == 65_536
    assert result.kv_cache_bytes == 4 * GI


def test_fp32_and_fp16_dtypes() -> None:
    shape = models.from_config(QWEN_25_05B)
    fp32 = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, dtype="fp32")
    fp16 = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, dtype="fp16")
    assert fp32.weights_bytes == 494_032_768 * 4 + 32768 * 64 * 4
    assert fp32.kv_bytes_per_token == 24_576
    assert fp16.dtype == "float16"
    assert fp16.weights_bytes == 992_259_840


def test_kv_tokens_caps_the_cache_but_never_below_one_sequence() -> None:
    shape = models.from_config(LLAMA_3_8B)
    capped = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, kv_tokens=16384)
    assert capped.kv_tokens == 16384
    assert capped.kv_cache_bytes == 2 * GI
    with pytest.raises(errors.BadRequest, match="under one full sequence of 8192 tokens"):
        estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, kv_tokens=100)


def test_enforce_eager_drops_the_cuda_graphs() -> None:
    result = estimate.estimate(
        models.from_config(LLAMA_3_8B), reserve_bytes=RESERVE, unit_bytes=GI, enforce_eager=True
    )
    assert result.cuda_graph_bytes == 0


def test_mixture_of_experts_parameters() -> None:
    # mistralai/Mixtral-8x7B: per layer 41,943,040 attention + 8 experts x 3 x 4096 x 14336
    # (1,409,286,144) + router 4096 x 8 + norms 8192 = 1,451,270,144; x 32 = 46,440,644,608
    # + embedding and lm_head 2 x 32000 x 4096 + final norm = 46,702,792,704 (published: 46.7B)
    mixtral = {
        **LLAMA_3_8B,
        "model_type": "mixtral",
        "vocab_size": 32000,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    shape = models.from_config(mixtral)
    assert shape.parameters().total == 46_702_792_704
    assert shape.mlp_width == 2 * 14336
    assert any("mixture of experts" in note for note in shape.notes)


def test_multimodal_configs_use_their_text_model() -> None:
    llava = {
        "model_type": "llava",
        "text_config": LLAMA_3_8B,
        "vision_config": {"hidden_size": 1024},
    }
    shape = models.from_config(llava)
    assert shape.parameters().total == 8_030_261_248
    assert any("encoder" in note for note in shape.notes)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("Qwen2.5-0.5B", 494_032_768),
        ("Qwen2.5-7B", 7_615_616_512),
        ("Llama-3.2-1B", 1_235_814_400),
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-70B", 70_553_706_496),
        ("Mistral-7B-v0.3", 7_248_023_552),
    ],
    ids=str,
)
def test_the_catalog_matches_published_parameter_counts(name: str, published: int) -> None:
    assert models.CATALOG[name].parameters().total == published


@given(
    st.sampled_from(sorted(models.CATALOG)),
    st.integers(min_value=1, max_value=65536),
    st.integers(min_value=1, max_value=256),
    st.sampled_from((64 * MI, 256 * MI, GI)),
)
def test_the_request_covers_the_total_in_whole_units(
    name: str, length: int, seqs: int, unit: int
) -> None:
    result = estimate.estimate(
        models.CATALOG[name],
        reserve_bytes=RESERVE,
        unit_bytes=unit,
        max_model_len=length,
        max_num_seqs=seqs,
    )
    parts = (
        result.weights_bytes
        + result.kv_cache_bytes
        + result.activation_bytes
        + result.cuda_graph_bytes
        + result.reserve_bytes
    )
    assert result.total_bytes == parts
    assert result.request_bytes % unit == 0
    assert result.total_bytes <= result.request_bytes < result.total_bytes + unit
    assert result.minimum_bytes <= result.request_bytes
    assert result.kv_tokens >= length
    more = estimate.estimate(
        models.CATALOG[name],
        reserve_bytes=RESERVE,
        unit_bytes=unit,
        max_model_len=length,
        max_num_seqs=seqs + 1,
    )
    assert more.total_bytes > result.total_bytes


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"model_type": "llama"}, "lacks hidden_size, num_hidden_layers, num_attention_heads"),
        ({**LLAMA_3_8B, "num_hidden_layers": 0}, "num_hidden_layers must be a positive"),
        ({**LLAMA_3_8B, "hidden_size": "4096"}, "hidden_size must be a positive whole number"),
        ({**LLAMA_3_8B, "num_attention_heads": 30}, "not a multiple of num_attention_heads"),
        ({**LLAMA_3_8B, "kv_lora_rank": 512}, "latent attention"),
        ({**LLAMA_3_8B, "layer_types": ["linear_attention"]}, "linear_attention"),
        ({**LLAMA_3_8B, "quantization_config": {"quant_method": "hqq"}}, "'hqq' is not one"),
    ],
    ids=[
        "missing-keys",
        "zero-layers",
        "string-width",
        "uneven-heads",
        "latent-attention",
        "linear-attention",
        "unknown-quantization",
    ],
)
def test_unusable_configs_are_bad_requests(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        models.from_config(config)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dtype": "fp64"}, "unknown dtype 'fp64'"),
        ({"quantization": "int3"}, "unknown quantization 'int3'"),
        ({"kv_cache_dtype": "int2"}, "unknown --kv-cache-dtype 'int2'"),
        ({"max_num_seqs": 0}, "--max-num-seqs must be at least 1"),
        ({"max_model_len": 0}, "--max-model-len must be at least 1"),
    ],
    ids=["dtype", "quantization", "kv-cache-dtype", "zero-sequences", "zero-length"],
)
def test_bad_arguments_are_bad_requests(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        estimate.estimate(
            models.from_config(LLAMA_3_8B), reserve_bytes=RESERVE, unit_bytes=GI, **kwargs
        )
    assert fragment in str(info.value)


def test_a_config_without_a_context_length_needs_max_model_len() -> None:
    config = {k: v for k, v in LLAMA_3_8B.items() if k != "max_position_embeddings"}
    shape = models.from_config(config)
    with pytest.raises(errors.BadRequest, match="pass --max-model-len"):
        estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI)
    result = estimate.estimate(shape, reserve_bytes=RESERVE, unit_bytes=GI, max_model_len=8192)
    assert result.weights_bytes == 16_062_619_648


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model folder holding the Llama-3-8B config, and no gpushare configuration around."""
    for key in ("GPUSHARE_CONFIG", "GPUSHARE_UNIT_BYTES", "GPUSHARE_RESERVE_BYTES"):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B))
    return folder


def test_the_command_prints_the_annotation_to_paste(
    model_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["estimate", str(model_folder / "config.json")]) == 0
    out = capsys.readouterr().out
    assert '      gpushare.io/gpu-memory: "25Gi"' in out
    assert "--max-model-len 8192 --max-num-seqs 8 --max-num-batched-tokens 8192" in out
    assert "vLLM starts in as little as 18Gi" in out
    assert "How this was estimated, and where it can be off:" in out


def test_the_command_reads_a_model_folder_and_prints_json(
    model_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["estimate", str(model_folder), "--json", "--max-num-seqs", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "Meta-Llama-3-8B"
    assert out["kv_cache_bytes"] == 4 * 8192 * 131_072
    assert out["request_bytes"] % GI == 0
    assert out["annotation"] == f'gpushare.io/gpu-memory: "{out["quantity"]}"'
    assert isinstance(out["notes"], list)


def test_the_command_follows_the_configured_unit_and_reserve(
    model_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSHARE_UNIT_BYTES", "256Mi")
    assert cli.main(["estimate", str(model_folder), "--json", "--reserve", "1Gi"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit_bytes"] == 256 * MI
    assert out["reserve_bytes"] == GI
    # 26,781,163,520 - 750,780,416 + 1 GiB = 27,104,124,928 -> 101 x 256 MiB
    assert out["request_bytes"] == 101 * 256 * MI


def test_the_command_knows_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", "Qwen2.5-0.5B", "--max-model-len", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 494_032_768


@pytest.mark.parametrize(
    ("name", "flags", "fragment"),
    [
        ("missing.json", [], "no such file or folder: "),
        ("empty", [], "holds no config.json"),
        ("broken.json", [], "is not JSON"),
        ("list.json", [], "is not a JSON object"),
        ("partial.json", [], "lacks num_hidden_layers"),
        ("partial.json", ["--unit", "1GB"], "unit_bytes: '1GB'"),
    ],
    ids=[
        "missing-file",
        "folder-without-config",
        "not-json",
        "not-an-object",
        "missing-keys",
        "bad-unit",
    ],
)
def test_bad_input_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flags: list[str], fragment: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    partial = {"hidden_size": 8, "vocab_size": 8, "num_attention_heads": 1, "intermediate_size": 8}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    assert cli.main(["estimate", str(tmp_path / name), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpushare estimate: ")
    assert fragment in err


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
        (["--quantization", "int3"], "argument --quantization: invalid choice: 'int3'"),
        (["--max-num-seqs", "0"], "argument --max-num-seqs: 0 must be at least 1"),
        (["--max-model-len", "lots"], "argument --max-model-len: 'lots' is not a whole number"),
    ],
    ids=["dtype", "quantization", "zero-sequences", "length-not-a-number"],
)
def test_bad_flags_are_usage_errors(flags: list[str], fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpushare.cli", "estimate", "Llama-3.1-8B", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("eager", "reserve", "warned"),
    [(False, RESERVE, True), (True, RESERVE, False), (False, 1536 * MI, False)],
    ids=["graphs-default-reserve", "eager", "graphs-raised-reserve"],
)
def test_with_cuda_graphs_a_reserve_under_the_measured_one_is_pointed_out(
    eager: bool, reserve: int, warned: bool
) -> None:
    shape = models.from_config(LLAMA_3_8B, name="Llama-3-8B")
    result = estimate.estimate(
        shape, reserve_bytes=reserve, unit_bytes=GI, max_model_len=4096, enforce_eager=eager
    )
    said = [note for note in result.notes if note.startswith("CUDA graphs are on")]
    assert bool(said) is warned
    if warned:
        assert "Set reserve_bytes to 1536Mi" in said[0]
