"""Configuration: file, then environment, then flags; every bad key named with what it accepts."""

import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushare.core import config, errors
from gpushare.core.quantities import GI, MI

SECTIONS: dict[str, type[pydantic.BaseModel]] = {
    "": config.Settings,
    "scheduler": config.SchedulerSettings,
    "webhook": config.WebhookSettings,
    "agent": config.AgentSettings,
}


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(errors.ConfigError) as info:
        config.validate(data)
    return str(info.value)


def test_defaults_need_no_configuration() -> None:
    settings = config.load(environ={})
    assert settings == config.Settings()
    assert settings.unit_bytes == GI
    assert settings.reserve_bytes == 716 * MI
    assert settings.policy == "fill"
    assert settings.isolation == "auto"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"bogus": 1},
            "bogus: unknown key; allowed: unit_bytes, policy, reserve_bytes, isolation,",
        ),
        (
            {"scheduler": {"listn": ":80"}},
            "scheduler.listn: unknown key; allowed: listen, url_prefix, heartbeat_timeout_seconds",
        ),
        ({"webhook": {"tls": True}}, "webhook.tls: unknown key; allowed: listen, scheduler_name"),
        ({"agent": {"nvml": "fake"}}, "agent.nvml: unknown key; allowed: kubelet_dir, mps_root,"),
        (
            {"policy": "pack"},
            "policy: 'pack' is not allowed; input should be 'fill', 'binpack' or 'spread'",
        ),
        (
            {"isolation": "full"},
            "isolation: 'full' is not allowed; input should be 'auto', 'cgroup', 'mps',",
        ),
        (
            {"agent": {"overuse_action": "kill"}},
            "agent.overuse_action: 'kill' is not allowed; input should be 'event' or 'evict'",
        ),
        ({"unit_bytes": "1GB"}, "unit_bytes: '1GB' is not a Kubernetes quantity"),
        ({"unit_bytes": "32Mi"}, "unit_bytes: a unit of 32 MiB is under the minimum of 64 MiB"),
        ({"unit_bytes": 0}, "unit_bytes: a unit of 0 B is under the minimum"),
        ({"reserve_bytes": "500m"}, "reserve_bytes: '500m' uses the sub-unit suffix"),
        ({"reserve_bytes": "-1Gi"}, "reserve_bytes: '-1Gi' is negative"),
        ({"reserve_bytes": True}, "reserve_bytes: True is not a memory quantity"),
        (
            {"agent": {"mps_server_bytes": 1.5}},
            "agent.mps_server_bytes: 1.5 is not a memory quantity",
        ),
        ({"agent": {"report_change_bytes": "lots"}}, "agent.report_change_bytes: 'lots' is not a"),
        (
            {"scheduler": {"heartbeat_timeout_seconds": 0}},
            "scheduler.heartbeat_timeout_seconds: Input should be greater than 0 (got 0)",
        ),
        ({"agent": {"poll_seconds": "soon"}}, "agent.poll_seconds: Input should be a valid number"),
        ({"agent": {"cdi": "maybe"}}, "agent.cdi: Input should be a valid boolean"),
        ({"webhook": "yes"}, "webhook: Input should be a valid dictionary"),
    ],
    ids=[
        "unknown-top-level-key",
        "unknown-scheduler-key",
        "unknown-webhook-key",
        "unknown-agent-key",
        "bad-policy",
        "bad-isolation",
        "bad-overuse-action",
        "unit-not-a-quantity",
        "unit-too-small",
        "unit-zero",
        "reserve-sub-unit",
        "reserve-negative",
        "reserve-boolean",
        "mps-server-float",
        "report-change-garbage",
        "heartbeat-timeout-zero",
        "poll-not-a-number",
        "cdi-not-a-boolean",
        "section-not-a-mapping",
    ],
)
def test_a_bad_key_is_named_with_what_it_accepts(data: dict[str, Any], expected: str) -> None:
    message = _error(data)
    assert message.startswith("invalid configuration:\n  ")
    assert expected in message


def test_every_bad_key_of_one_file_is_named() -> None:
    message = _error({"polcy": "binpack", "unit_bytes": "1GB", "scheduler": {"listn": ":1"}})
    assert "polcy: unknown key" in message
    assert "unit_bytes: '1GB'" in message
    assert "scheduler.listn: unknown key" in message


_identifiers = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")


@given(st.sampled_from(sorted(SECTIONS)), _identifiers)
def test_any_unknown_key_is_named(section: str, key: str) -> None:
    model = SECTIONS[section]
    if key in model.model_fields:
        return
    data: dict[str, Any] = {key: 1} if not section else {section: {key: 1}}
    dotted = f"{section}.{key}" if section else key
    allowed = ", ".join(model.model_fields)
    assert f"{dotted}: unknown key; allowed: {allowed}" in _error(data)


_SCALAR_KEYS = [
    (section, name)
    for section, model in SECTIONS.items()
    for name, field in model.model_fields.items()
    if field.annotation not in SECTIONS.values()
    and field.annotation not in (str,)
    and typing.get_origin(field.annotation) is not dict  # card_costs: a mapping, tested below
]


@given(
    st.sampled_from(_SCALAR_KEYS),
    st.sampled_from(["not-a-value", [1, 2], {"a": 1}, -(10**30), "-3Gi"]),
)
def test_any_bad_value_is_named(key: tuple[str, str], value: object) -> None:
    section, name = key
    data: dict[str, Any] = {name: value} if not section else {section: {name: value}}
    dotted = f"{section}.{name}" if section else name
    try:
        config.validate(data)
    except errors.ConfigError as exc:
        assert f"\n  {dotted}: " in str(exc)
    else:
        # Only a value the field really accepts may pass (a path or bool given as text).
        assert isinstance(value, str)


def test_environment_overrides_a_top_level_key_and_a_section_key() -> None:
    settings = config.load(
        environ={"GPUSHARE_UNIT_BYTES": "512Mi", "GPUSHARE_SCHEDULER__LISTEN": "127.0.0.1:9999"}
    )
    assert settings.unit_bytes == 512 * MI
    assert settings.scheduler.listen == "127.0.0.1:9999"


def test_a_bad_environment_key_is_named() -> None:
    with pytest.raises(errors.ConfigError, match=r"scheduler\.listn: unknown key"):
        config.load(environ={"GPUSHARE_SCHEDULER__LISTN": ":1"})
    with pytest.raises(errors.ConfigError, match="unit_bytes: '1GB'"):
        config.load(environ={"GPUSHARE_UNIT_BYTES": "1GB"})


def test_other_gpushare_variables_are_not_configuration() -> None:
    environ = {
        "GPUSHARE_GRANTED_BYTES": "21474836480",
        "GPUSHARE_CARD_UUID": "GPU-1",
        "GPUSHARE_VLLM_GPU_MEMORY_UTILIZATION": "0.2437",
        "GPUSHARE_A__B__C": "x",
        "PATH": "/usr/bin",
    }
    assert config.load(environ=environ) == config.Settings()


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(
        "unit_bytes: 256Mi\npolicy: spread\nreserve_bytes: 1Gi\n"
        "scheduler:\n  listen: 0.0.0.0:1\n  url_prefix: /x\n"
    )
    environ = {
        "GPUSHARE_CONFIG": str(file),
        "GPUSHARE_POLICY": "binpack",
        "GPUSHARE_SCHEDULER__LISTEN": "0.0.0.0:2",
    }
    settings = config.load(
        environ=environ, overrides={"scheduler.listen": "0.0.0.0:3", "reserve_bytes": None}
    )
    assert settings.unit_bytes == 256 * MI  # file
    assert settings.reserve_bytes == GI  # file (a flag left unset does not override)
    assert settings.policy == "binpack"  # environment over file
    assert settings.scheduler.url_prefix == "/x"  # file, beside an overridden key
    assert settings.scheduler.listen == "0.0.0.0:3"  # flag over environment


def test_an_explicit_file_wins_over_the_environment_variable(tmp_path: Path) -> None:
    named = tmp_path / "named.yaml"
    named.write_text("policy: spread\n")
    other = tmp_path / "other.yaml"
    other.write_text("policy: bogus\n")
    settings = config.load(file=named, environ={"GPUSHARE_CONFIG": str(other)})
    assert settings.policy == "spread"


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    file = tmp_path / "empty.yaml"
    file.write_text("")
    assert config.load(file=file, environ={}) == config.Settings()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read configuration file"),
        ("policy: [unclosed\n", "is not YAML"),
        ("- a\n- b\n", "must hold a mapping of keys"),
        ("just text\n", "must hold a mapping of keys"),
        (b"\xff\xfe\x00policy: spread", "is not UTF-8 text"),
        ("bogus: 1\n", "bogus: unknown key"),
    ],
    ids=["missing", "not-yaml", "a-list", "a-scalar", "not-utf8", "bad-key"],
)
def test_file_errors_are_config_errors(
    tmp_path: Path, content: str | bytes | None, fragment: str
) -> None:
    file = tmp_path / "config.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    with pytest.raises(errors.ConfigError) as info:
        config.load(environ={"GPUSHARE_CONFIG": str(file)})
    assert fragment in str(info.value)


def test_a_folder_is_not_a_configuration_file(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="cannot read configuration file"):
        config.load(file=tmp_path, environ={})


def test_an_override_into_a_non_section_is_named(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("scheduler: 5\n")
    with pytest.raises(errors.ConfigError, match=r"scheduler\.listen: scheduler is not a section"):
        config.load(file=file, environ={}, overrides={"scheduler.listen": ":1"})


def test_settings_are_frozen() -> None:
    settings = config.Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.policy = "spread"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8888", ("0.0.0.0", 8888)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8888", ("::1", 8888)),
        (":8888", ("0.0.0.0", 8888)),
    ],
    ids=["all-ipv4", "any-port", "ipv6", "no-host"],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8888", "host:", "host:http", "host:port", "host:70000"])
def test_a_bad_listen_address_is_a_configuration_error(text: str) -> None:
    with pytest.raises(errors.ConfigError, match="is not HOST:PORT"):
        config.parse_listen(text)


def test_card_costs_weigh_named_models_and_memory_otherwise() -> None:
    settings = config.validate({"card_costs": {"NVIDIA H100 80GB HBM3": 3}})
    assert settings.card_cost("NVIDIA H100 80GB HBM3", 79 * GI) == 3.0
    assert settings.card_cost("NVIDIA L4", 22 * GI) == 22.0
    with pytest.raises(errors.ConfigError, match=r"card_costs\.NVIDIA L4: .*greater than 0"):
        config.validate({"card_costs": {"NVIDIA L4": 0}})
