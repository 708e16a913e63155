"""The simulated vLLM start: kubelet's expansion, vLLM's flag forms and its memory check."""

from decimal import Decimal

import pytest

from gpushare.core import names, sizing
from gpushare.core.quantities import GI, MI
from gpushare.simulator import fleet, vllm

H100 = fleet.lookup("H100-80GB").cuda_total_bytes


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("--gpu-memory-utilization=$(U)", "--gpu-memory-utilization=0.25"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(U)", "$(U)"),
        ("a$(U)b$(U)", "a0.25b0.25"),
    ],
    ids=["set", "unset-kept", "escaped", "twice"],
)
def test_kubelet_expands_variables_in_arguments(text: str, expanded: str) -> None:
    assert vllm.expand(text, {"U": "0.25"}) == expanded


def test_a_spec_variable_wins_over_allocate_and_is_expanded_from_it() -> None:
    container = {"env": [{"name": "X", "value": "$(GPUSHARE_GRANTED_BYTES)"}, {"name": "Y",
                                                                              "value": "spec"}]}
    env = vllm.container_env(container, {"GPUSHARE_GRANTED_BYTES": "10", "Y": "allocate"})
    assert env["X"] == "10"
    assert env["Y"] == "spec"


@pytest.mark.parametrize(
    ("words", "value"),
    [
        ([], Decimal("0.92")),
        (["--gpu-memory-utilization", "0.5"], Decimal("0.5")),
        (["--gpu-memory-utilization=0.4"], Decimal("0.4")),
        (["--gpu_memory_utilization", "0.3"], Decimal("0.3")),
        (["--gpu-memory-utilization=0.9", "--gpu-memory-utilization", "0.2"], Decimal("0.2")),
    ],
    ids=["default", "separate", "equals", "underscore", "last-wins"],
)
def test_vllm_reads_its_utilization_flag_in_every_form(words: list[str], value: Decimal) -> None:
    assert vllm.utilization(words) == value


def test_an_unexpanded_variable_makes_vllm_exit() -> None:
    refused = vllm.start([names.VLLM_UTILIZATION_ARG], card_free_bytes=H100,
                         cuda_total_bytes=H100, limit_bytes=None)
    assert isinstance(refused, vllm.Refused)
    assert "invalid float value" in refused.message


def test_the_measured_refusal_under_an_8g_limit_is_reproduced() -> None:
    # docs/design.md (measured facts): asking for 0.30 of the card under an 8 GiB MPS limit,
    # vLLM refused to start.
    refused = vllm.start(["--gpu-memory-utilization", "0.30"], card_free_bytes=H100,
                         cuda_total_bytes=H100, limit_bytes=8 * GI)
    assert isinstance(refused, vllm.Refused)
    assert "(7.50/79.18 GiB)" in refused.message
    assert "(0.30, 23.75 GiB)" in refused.message


@pytest.mark.parametrize("grant_gib", [3, 12, 20, 40, 79])
def test_the_utilization_a_grant_yields_always_starts_within_it(grant_gib: int) -> None:
    grant = grant_gib * GI
    value = sizing.utilization(granted_bytes=grant, reserve_bytes=716 * MI, cuda_total_bytes=H100)
    started = vllm.start([f"--gpu-memory-utilization={value}"], card_free_bytes=H100,
                         cuda_total_bytes=H100, limit_bytes=grant)
    assert isinstance(started, vllm.Started)
    assert started.used_bytes <= grant


def test_without_a_limit_the_card_free_memory_decides() -> None:
    busy = vllm.start(["--gpu-memory-utilization=0.5"], card_free_bytes=30 * GI,
                      cuda_total_bytes=H100, limit_bytes=None)
    assert isinstance(busy, vllm.Refused)


@pytest.mark.parametrize(
    ("text", "limit"),
    [("GPU-1=20480M", 20 * GI), ("0=2G", 2 * GI), ("GPU-2=1G", None), ("", None)],
    ids=["uuid-mib", "ordinal-gib", "other-card", "unset"],
)
def test_mps_limits_are_read_per_card(text: str, limit: int | None) -> None:
    env = {names.ENV_MPS_MEM_LIMIT: text} if text else {}
    assert vllm.mps_limit_bytes(env, "GPU-1") == limit


def test_a_budget_without_room_for_one_full_sequence_is_refused() -> None:
    words = ["--gpu-memory-utilization=0.1"]
    budget = int(Decimal("0.1") * H100)
    short = vllm.start(words, card_free_bytes=H100, cuda_total_bytes=H100, limit_bytes=None,
                       minimum_budget_bytes=budget + GI)
    assert isinstance(short, vllm.Refused)
    assert "max_model_len" in short.message
    enough = vllm.start(words, card_free_bytes=H100, cuda_total_bytes=H100, limit_bytes=None,
                        minimum_budget_bytes=budget)
    assert isinstance(enough, vllm.Started)
