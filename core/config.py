"""Configuration from one place: a file (the mounted ConfigMap), then environment, then flags.

Only this module reads the environment. Every part receives a validated :class:`Settings`. A bad
key is named with its allowed values; unknown keys are refused, so a typo never passes silently.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast, get_args

import pydantic
import yaml

from gpushare.core import errors, grants, names, placement, quantities

Isolation = Literal["cgroup", "mps", "mps-shared", "none"]
"""A node's isolation: per-cgroup driver limits, an MPS daemon per container or per node, none."""
MPS_MODES: Final[frozenset[Isolation]] = frozenset({"mps", "mps-shared"})
"""The isolations that run MPS daemons (memory limit and compute share through MPS)."""
IsolationSetting = Literal["auto", "cgroup", "mps", "mps-shared", "none"]
"""The configured isolation: ``auto`` is the strongest the node supports (``cgroup`` or ``mps``)."""
Backend = Literal["extender", "dra"]


def _bytes(value: object) -> int:
    try:
        return quantities.parse_bytes(value)  # type: ignore[arg-type]
    except errors.QuantityError as exc:
        raise ValueError(str(exc)) from exc


ByteSize = Annotated[int, pydantic.BeforeValidator(_bytes)]


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class SchedulerSettings(_Section):
    """The extender."""

    listen: str = "0.0.0.0:8888"
    url_prefix: str = "/gpushare-scheduler"
    heartbeat_timeout_seconds: float = pydantic.Field(default=300.0, gt=0)
    """A node whose agent has been silent this long is not a place to schedule (5 heartbeats)."""


class WebhookSettings(_Section):
    """The admission webhook."""

    listen: str = "0.0.0.0:9443"
    scheduler_name: str = names.SCHEDULER_NAME
    """``schedulerName`` set on mutated pods."""
    largest_card_bytes: ByteSize = pydantic.Field(default=288 * quantities.GI, gt=0, le=2**60)
    """The largest card's CUDA memory assumed until a node reports its cards: a larger request is
    refused even then. 288 GiB covers every NVIDIA card made so far (a B300 has 288 GB); the
    bound of 1 EiB keeps every unit count far inside int64."""


class AgentSettings(_Section):
    """The device plugin and its agent on each GPU node."""

    kubelet_dir: Path = Path("/var/lib/kubelet")
    mps_root: Path = Path("/run/gpushare/mps")
    """Host folder under which each MPS daemon gets its pipe directory."""
    mps_server_bytes: ByteSize = 66 * quantities.MI
    """Card memory each ``nvidia-cuda-mps-server`` takes (66 MiB measured on an H100)."""
    poll_seconds: float = pydantic.Field(default=5.0, gt=0)
    heartbeat_seconds: float = pydantic.Field(default=60.0, gt=0)
    """Report at least this often even when nothing changed; a thousand nodes stay quiet."""
    report_change_bytes: ByteSize = 256 * quantities.MI
    """A card's used memory must move this much before a report goes out early."""
    overuse_grace_seconds: float = pydantic.Field(default=30.0, ge=0)
    overuse_action: Literal["event", "evict"] = "event"
    escape_action: Literal["event", "evict"] = "evict"
    """What the agent does at once to a container that leaves its isolation (a CUDA context outside
    MPS, an MPS daemon of its own, a process past its MPS limit): an Event, and by default an
    eviction. Unlike over-use, an escape has no grace: nothing inside the grant explains it."""
    escape_slack_bytes: ByteSize = 512 * quantities.MI
    """How far one MPS client may read over its container's grant in NVML before its limit counts as
    broken: the limit includes the CUDA context, and NVML's figure ran at most 256 MiB over it."""
    cdi: bool = False
    """Name the card as a CDI device (``nvidia.com/gpu=<uuid>``) in Allocate's response."""
    cdi_spec_dir: Path = Path("/var/run/cdi")
    """Where the DRA backend writes each prepared claim's CDI spec (the runtime reads it)."""


def backend_for(labels: Mapping[str, str], configured: Backend) -> Backend:
    """The backend of a node (or namespace) labelled ``gpushare.io/backend``, else ``configured``;
    a value that names no backend is a ConfigError saying what to write."""
    value = labels.get(names.LABEL_BACKEND)
    if value is None:
        return configured
    if value not in get_args(Backend):
        raise errors.ConfigError(
            f"label {names.LABEL_BACKEND}={value!r}: write {' or '.join(get_args(Backend))}"
        )
    return cast(Backend, value)


class Settings(_Section):
    """Cluster-wide configuration shared by every part."""

    unit_bytes: ByteSize = quantities.GI
    """The memory unit of ``gpushare.io/gpu-memory``; requests round up to whole units."""
    policy: placement.Policy = placement.DEFAULT_POLICY
    """Card choice: ``fill`` (cards in use first, by share filled), ``binpack`` or ``spread``."""
    reserve_bytes: ByteSize = 716 * quantities.MI
    """Per-instance memory outside vLLM's budget (CUDA context ~620 MiB measured, plus margin)."""
    isolation: IsolationSetting = "auto"
    card_costs: dict[str, pydantic.PositiveFloat] = {}
    """What one card of a GPU model weighs in the simulator's cost figures, by NVML product name
    (``NVIDIA H100 80GB HBM3: 3.0``); a model not named weighs its usable memory in GiB."""
    backend: Backend = "extender"
    """Who places pods: the extender (extended resource), or kube-scheduler's DRA allocator."""
    scheduler: SchedulerSettings = SchedulerSettings()
    webhook: WebhookSettings = WebhookSettings()
    agent: AgentSettings = AgentSettings()

    @property
    def overheads(self) -> grants.Overheads:
        """Card memory outside every grant under this isolation (:mod:`gpushare.core.grants`)."""
        return grants.overheads(self.isolation, self.agent.mps_server_bytes)

    @property
    def allocation_overhead_bytes(self) -> int:
        """Card memory each allocation takes beyond its grant (one MPS server in ``mps``)."""
        return self.overheads.per_allocation

    @property
    def card_overhead_bytes(self) -> int:
        """Card memory no grant may use, once per card (the shared MPS server in ``mps-shared``)."""
        return self.overheads.per_card

    def card_cost(self, model: str, capacity_bytes: int) -> float:
        """The configured cost of a card of ``model``, else its usable memory in GiB."""
        return self.card_costs.get(model, capacity_bytes / quantities.GI)

    @pydantic.field_validator("unit_bytes")
    @classmethod
    def _unit_in_range(cls, value: int) -> int:
        try:
            quantities.check_unit(value)
        except errors.ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8888``, ``:8888`` for every address) as a host and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(f"listen address {text!r} is not HOST:PORT, e.g. 0.0.0.0:8888")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def load(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from the file named by ``GPUSHARE_CONFIG``, then environment, then flags.

    Environment keys are ``GPUSHARE_<KEY>`` for top-level keys and ``GPUSHARE_<SECTION>__<KEY>``
    for nested ones (``GPUSHARE_SCHEDULER__LISTEN``).
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = file or (Path(env[names.ENV_CONFIG_FILE]) if env.get(names.ENV_CONFIG_FILE) else None)
    if path is not None:
        data = _read_file(path)
    for key, value in env.items():
        if not key.startswith(names.ENV_PREFIX) or key == names.ENV_CONFIG_FILE:
            continue
        parts = key.removeprefix(names.ENV_PREFIX).lower().split("__")
        if len(parts) > 2 or parts[0] not in Settings.model_fields:
            continue  # other GPUSHARE_* variables (the contract's env) are not configuration
        _merge(data, parts, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _merge(data, dotted.split("."), value)
    return validate(data)


def validate(data: Mapping[str, Any]) -> Settings:
    """Validate raw configuration, naming each bad key and what it accepts."""
    try:
        return Settings.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.ConfigError(describe(exc)) from exc


def describe(exc: pydantic.ValidationError) -> str:
    """One line per bad key: ``scheduler.listn: unknown key; allowed: listen, url_prefix, ...``."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc)
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_section_fields(loc[:-1]))
            lines.append(f"{key}: unknown key; allowed: {allowed}")
        elif error["type"] == "literal_error":
            lines.append(f"{key}: {error['input']!r} is not allowed; {error['msg'].lower()}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {error['input']!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section_fields(path: list[str]) -> list[str]:
    model: type[pydantic.BaseModel] = Settings
    for part in path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _merge(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise errors.ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise errors.ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise errors.ConfigError(
            f"configuration file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from exc
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"configuration file {path} is not YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise errors.ConfigError(f"configuration file {path} must hold a mapping of keys")
    return raw
