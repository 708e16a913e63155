"""A simulated vLLM start: kubelet's argument expansion, vLLM's flag parsing and its memory check.

kubelet expands ``$(VAR)`` in ``command`` and ``args`` from the container's environment (the device
plugin's Allocate envs included); ``$$`` escapes. vLLM then reads ``--gpu-memory-utilization``
(``--flag v``, ``--flag=v``, ``--flag_name v``; the last one wins; 0.92 by default) and refuses to
start when the free memory it sees is under ``utilization * total``, where total is CUDA's (NVML
total minus the driver's reserved part). Under an MPS limit L a client sees ``L - context`` free.
Once started, the process holds its budget plus a little outside it.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final

from gpushare.core import names
from gpushare.core.quantities import GI, MI

DEFAULT_UTILIZATION: Final = Decimal("0.92")
CONTEXT_AT_CHECK_BYTES: Final = 512 * MI
"""What a client's CUDA context has taken when vLLM checks: under an MPS limit of 2G a client saw
~1.5 GiB free, and under 8G vLLM reported 7.5 GiB free (H100, driver 580)."""
RUNNING_EXTRA_BYTES: Final = 200 * MI
"""NVML's per-process figure of a running vLLM exceeded utilization * total by ~0.2 GiB."""

_VARIABLE: Final = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FLAGS: Final = (names.VLLM_UTILIZATION_FLAG, names.VLLM_UTILIZATION_FLAG_UNDERSCORED)


def expand(text: str, env: Mapping[str, str]) -> str:
    """kubelet's expansion: ``$(VAR)`` from ``env`` (left as is when undefined), ``$$`` → ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return _VARIABLE.sub(replace, text)


def container_env(
    container: Mapping[str, object], allocate_envs: Mapping[str, str]
) -> dict[str, str]:
    """The environment kubelet gives the container: Allocate's envs, then the spec's (which win)."""
    env = dict(allocate_envs)
    for item in container.get("env") or []:  # type: ignore[attr-defined]
        if isinstance(item, Mapping) and "value" in item:
            env[str(item["name"])] = expand(str(item["value"]), env)
    return env


def argv(container: Mapping[str, object], env: Mapping[str, str]) -> list[str]:
    """The container's command line after kubelet's expansion."""
    words = [*(container.get("command") or []), *(container.get("args") or [])]  # type: ignore[misc]
    return [expand(str(word), env) for word in words]


def utilization(words: Sequence[str]) -> Decimal:
    """The ``--gpu-memory-utilization`` vLLM would use; raises ValueError for a bad value."""
    value: str | None = None
    for i, word in enumerate(words):
        flag, sep, inline = word.partition("=")
        if flag in _FLAGS:
            if sep:
                value = inline
            elif i + 1 < len(words):
                value = words[i + 1]
            else:
                raise ValueError(f"{flag} needs a value")
    if value is None:
        return DEFAULT_UTILIZATION
    try:
        parsed = Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"{names.VLLM_UTILIZATION_FLAG}: invalid float value: {value!r}") from exc
    if not 0 < parsed <= 1:
        raise ValueError(f"{names.VLLM_UTILIZATION_FLAG} must be in (0, 1], got {value}")
    return parsed


def mps_limit_bytes(env: Mapping[str, str], card: str) -> int | None:
    """The client's MPS limit on ``card``: ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=<uuid>=20480M``."""
    text = env.get(names.ENV_MPS_MEM_LIMIT)
    if not text:
        return None
    for entry in text.split(","):
        device, _, amount = entry.partition("=")
        if device.strip() in (card, "0") and amount:
            scale = {"M": MI, "G": GI}.get(amount[-1].upper(), 1)
            digits = amount[:-1] if scale != 1 else amount
            return int(Decimal(digits) * scale)
    return None


@dataclass(frozen=True, slots=True)
class Started:
    """vLLM is up and holds ``used_bytes`` of its card."""

    utilization: Decimal
    used_bytes: int


@dataclass(frozen=True, slots=True)
class Refused:
    """vLLM exited at start-up with ``message``."""

    message: str


def start(
    words: Sequence[str],
    *,
    card_free_bytes: int,
    cuda_total_bytes: int,
    limit_bytes: int | None,
    minimum_budget_bytes: int | None = None,
) -> Started | Refused:
    """vLLM's start-up checks: the memory its process sees, then room for one full sequence.

    ``minimum_budget_bytes`` is what the model needs inside the budget with the KV cache of one
    sequence of ``--max-model-len`` tokens, where known: vLLM refuses a budget whose KV cache
    cannot hold one such sequence.
    """
    try:
        value = utilization(words)
    except ValueError as exc:
        return Refused(f"vLLM: {exc}")
    free = card_free_bytes - CONTEXT_AT_CHECK_BYTES
    if limit_bytes is not None:
        free = min(free, limit_bytes - CONTEXT_AT_CHECK_BYTES)
    wanted = int(value * cuda_total_bytes)
    if free < wanted:
        return Refused(
            f"Free memory on device cuda:0 ({max(free, 0) / GI:.2f}/{cuda_total_bytes / GI:.2f}"
            f" GiB) on startup is less than desired GPU memory utilization ({value},"
            f" {wanted / GI:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used"
            " by other processes."
        )
    if minimum_budget_bytes is not None and wanted < minimum_budget_bytes:
        return Refused(
            f"ValueError: the budget of {wanted / GI:.2f} GiB (utilization {value}) leaves less"
            f" KV cache than one sequence of the model's max seq len needs (a budget of"
            f" {minimum_budget_bytes / GI:.2f} GiB). Try increasing `gpu_memory_utilization` or"
            " decreasing `max_model_len` when initializing the engine."
        )
    used = wanted + RUNNING_EXTRA_BYTES
    if limit_bytes is not None:
        used = min(used, limit_bytes)
    return Started(value, used)
