"""Properties of generated pods, scripts and annotations: no crash, valid idempotent patches."""

import shlex
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpushare.core import config, names
from gpushare.webhook import mutation, shell, validation, vllm
from tests.webhook import builders, strategies

SETTINGS = config.Settings()
H100 = (81_559 - 479) * 1024**2
"""An H100 80GB's CUDA total (NVML's 81,559 MiB less the 479 MiB the driver reserves)."""
OURS = names.VLLM_UTILIZATION_ARG
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(strategies.pods())
def test_a_mutated_pod_is_valid_and_mutating_it_again_changes_nothing(pod: dict[str, Any]) -> None:
    result = mutation.pod(pod, settings=SETTINGS, largest_cuda_total_bytes=H100)
    if not result.allowed:
        assert result.patch == () and all(r.message for r in result.reasons)
        return
    after = builders.apply(pod, result.patch)
    builders.check_pod(after)
    again = mutation.pod(after, settings=SETTINGS, largest_cuda_total_bytes=H100)
    assert again.allowed and again.patch == ()
    if not result.patch:
        return
    grant = after["metadata"]["annotations"][names.ANNOTATION_MUTATED]
    holders = [
        c
        for c in after["spec"]["containers"]
        if names.RESOURCE_GPU_MEMORY in c["resources"].get("limits", {})
    ]
    assert len(holders) == 1
    holder = holders[0]
    assert holder["resources"]["limits"][names.RESOURCE_GPU_MEMORY] == grant
    assert holder["resources"]["requests"][names.RESOURCE_GPU_MEMORY] == grant
    assert names.NVIDIA_GPU_RESOURCE not in holder["resources"]["limits"]
    assert all(e["name"] not in names.SYSTEM_ENV for e in holder.get("env", []))
    argv = (holder.get("command") or []) + (holder.get("args") or [])
    if vllm.plan(holder).runs_vllm:
        assert sum(OURS in token for token in argv) == 1
    assert after["spec"]["schedulerName"] == names.SCHEDULER_NAME


@SLOW
@given(
    strategies.ANNOTATION_VALUES, st.integers(min_value=0, max_value=200).map(lambda g: g * 1024**3)
)
def test_any_annotation_value_gets_a_verdict_with_a_reason(value: str, largest: int) -> None:
    requested, reasons, _ = validation.memory_bytes(
        value, settings=SETTINGS, largest_cuda_total_bytes=largest or None
    )
    assert (requested is None) == bool(reasons)
    if requested is not None:
        assert requested > SETTINGS.reserve_bytes
    for reason in reasons:
        assert names.ANNOTATION_GPU_MEMORY in reason.message


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(exclude_characters="\0"), max_size=12),
        min_size=1,
        max_size=8,
    )
)
def test_the_lexer_reads_quoted_words_as_the_shell_does(words: list[str]) -> None:
    script = shlex.join(words)
    commands = shell.commands(script)
    assert [c.literals() for c in commands] == [words]


@settings(max_examples=300, deadline=None)
@given(
    strategies.SERVER_COMMANDS.filter(lambda c: c[0] != "python" or c[1] == "-m"),
    strategies.SAFE_ARGS,
)
def test_a_shell_string_is_rewritten_as_the_list_form_is(
    server: list[str], args: list[str]
) -> None:
    listed = vllm.plan({"name": "s", "command": server, "args": args})
    script = "exec " + shlex.join(server + args)
    shelled = vllm.plan({"name": "s", "command": ["sh", "-c", script]})
    assert shelled.problem is None and listed.problem is None
    assert shelled.command is not None and listed.args is not None
    words = shlex.split(shelled.command[2])
    assert words[1:-1] == server + listed.args[:-1]
    assert words[-1] == OURS
