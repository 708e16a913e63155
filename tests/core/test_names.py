"""The product's names: one module holds them, and they do not collide."""

from gpushare.core import config, names


def _constants() -> dict[str, str]:
    return {
        key: value for key, value in vars(names).items() if key.isupper() and isinstance(value, str)
    }


def test_annotation_and_label_names_live_under_our_domain() -> None:
    ours = {k: v for k, v in _constants().items() if k.startswith(("ANNOTATION_", "RESOURCE_"))}
    assert ours
    assert all(value.startswith(f"{names.DOMAIN}/") for value in ours.values())


def test_annotation_names_are_distinct() -> None:
    annotations = [v for k, v in _constants().items() if k.startswith("ANNOTATION_")]
    # The user's annotation and the extended resource share one spelling on purpose; they live
    # in different places (metadata.annotations, resources.limits).
    assert len(annotations) == len(set(annotations))


def test_the_injected_vllm_argument_reads_the_allocate_environment() -> None:
    assert names.VLLM_UTILIZATION_ARG == (
        "--gpu-memory-utilization=$(GPUSHARE_VLLM_GPU_MEMORY_UTILIZATION)"
    )
    assert names.ENV_VLLM_UTILIZATION in names.SYSTEM_ENV


def test_contract_environment_names_are_not_configuration_keys() -> None:
    for env in names.SYSTEM_ENV:
        if env.startswith(names.ENV_PREFIX):
            key = env.removeprefix(names.ENV_PREFIX).lower().split("__")[0]
            assert key not in config.Settings.model_fields


def test_every_annotation_gpushare_writes_on_pods_is_a_system_annotation() -> None:
    written = {
        value
        for key, value in _constants().items()
        if key.startswith("ANNOTATION_") and key not in ("ANNOTATION_NODE_REPORT",)
    } - set(names.USER_ANNOTATIONS)
    assert written == names.SYSTEM_ANNOTATIONS
