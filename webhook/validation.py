"""Admission checks: the gpushare annotations and InferenceServices. Pure: dicts in, reasons out.

Each check returns :class:`Reason` values; a reason's ``code`` is stable (a metrics label) and its
``message`` says what was wrong and what to write instead.
"""

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpushare.core import config, errors, grants, names, placement, quantities
from gpushare.webhook import vllm

USER_ANNOTATIONS: Final = names.USER_ANNOTATIONS
"""The annotations a user writes."""

COMPONENTS: Final = ("transformer", "explainer")
"""InferenceService components other than the predictor: KServe copies the annotations to their
pods too."""


FRAMEWORKS: Final = (
    "huggingface",
    "lightgbm",
    "onnx",
    "paddle",
    "pmml",
    "pytorch",
    "sklearn",
    "tensorflow",
    "triton",
    "xgboost",
)
"""The predictor fields of KServe's built-in frameworks (``spec.predictor.<framework>``)."""

_NAME_CUTOFF: Final = 0.6
_KEY_CUTOFF: Final = 0.8
"""difflib ratios: ``gpu-mem`` scores 0.82 against ``gpu-memory``, ``gpu`` only 0.46."""


@dataclass(frozen=True)
class Reason:
    """Why an object is refused: a stable code and a message for the person who wrote it."""

    code: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """The outcome of a validation: refused when ``reasons`` is not empty."""

    reasons: tuple[Reason, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        """Whether the object may pass."""
        return not self.reasons

    @property
    def message(self) -> str:
        """All reasons as one message."""
        return "; ".join(reason.message for reason in self.reasons)


def largest_grant_bytes(cuda_total_bytes: int, *, settings: config.Settings) -> int:
    """The largest grant an idle card of ``cuda_total_bytes`` holds (see ``core/grants.py``)."""
    return grants.largest_grant_bytes(cuda_total_bytes, settings.unit_bytes, settings.overheads)


def memory_bytes(
    value: object, *, settings: config.Settings, largest_cuda_total_bytes: int | None
) -> tuple[int | None, list[Reason], list[str]]:
    """Check a ``gpushare.io/gpu-memory`` value: its bytes (``None`` if refused), why, warnings.

    ``largest_cuda_total_bytes`` is the largest CUDA total (NVML total less the driver's reserved
    part) any node reports, ``None`` while none does.
    """
    key = names.ANNOTATION_GPU_MEMORY
    if not isinstance(value, str):
        return None, [Reason("unparseable-quantity", f'{key} must be a string such as "20Gi"')], []
    try:
        requested = quantities.parse_bytes(value)
    except errors.QuantityError as exc:
        return None, [Reason("unparseable-quantity", f"{key}: {exc}")], []
    if requested == 0:
        message = f'{key}: {value!r} asks for no memory; write what the server needs, e.g. "20Gi"'
        return None, [Reason("not-positive", message)], []
    reserve = settings.reserve_bytes
    if requested <= reserve:
        smallest = quantities.to_units(reserve + 1, settings.unit_bytes) * settings.unit_bytes
        message = (
            f"{key}: {value!r} ({quantities.format_bytes(requested)}) does not exceed the"
            f" per-instance reserve of {quantities.format_bytes(reserve)} (the CUDA context,"
            " outside vLLM's budget), so vLLM would get nothing: ask for more, at least"
            f" {quantities.to_quantity(smallest)!r}"
        )
        return None, [Reason("below-reserve", message)], []
    warnings = []
    if largest_cuda_total_bytes is None:
        largest_cuda_total_bytes = settings.webhook.largest_card_bytes
        warnings.append(
            f"gpushare: no GPU node has reported its cards yet, so {key}: {value} was checked only"
            " against the configured ceiling (webhook.largest_card_bytes,"
            f" {quantities.format_bytes(largest_cuda_total_bytes)})"
        )
    if requested > largest_cuda_total_bytes:  # also keeps the unit count below
        granted = requested
    else:
        granted = quantities.to_units(requested, settings.unit_bytes) * settings.unit_bytes
    most = largest_grant_bytes(largest_cuda_total_bytes, settings=settings)
    if granted > most:
        reason = _above_largest_grant(
            value,
            requested,
            most=most,
            cuda_total_bytes=largest_cuda_total_bytes,
            settings=settings,
        )
        return None, [reason], []
    return requested, [], warnings


def _above_largest_grant(
    value: str, requested: int, *, most: int, cuda_total_bytes: int, settings: config.Settings
) -> Reason:
    overhead = settings.allocation_overhead_bytes + settings.card_overhead_bytes
    server = f", less {quantities.format_bytes(overhead)} for an MPS server" if overhead else ""
    advice = (
        f"ask for at most {quantities.to_quantity(most)!r}, or remove the annotation to use whole"
        " cards"
        if most
        else "remove the annotation to use whole cards"
    )
    message = (
        f"{names.ANNOTATION_GPU_MEMORY}: {value!r} ({quantities.format_bytes(requested)}) is more"
        f" than the largest grant possible, {quantities.format_bytes(most)}: the largest GPU the"
        f" cluster reports has {quantities.format_bytes(cuda_total_bytes)} for CUDA{server}, in"
        f" whole units of {quantities.format_bytes(settings.unit_bytes)}; {advice}"
    )
    return Reason("above-largest-card", message)


def policy(value: object) -> list[Reason]:
    """Check the ``gpushare.io/policy`` value."""
    if value in placement.POLICIES:
        return []
    allowed = ", ".join(placement.POLICIES)
    message = f"{names.ANNOTATION_POLICY}: {value!r} is not a policy; write one of {allowed}"
    return [Reason("bad-policy", message)]


def annotation_keys(
    annotations: Mapping[str, Any], *, where: str = "", ours: frozenset[str] = frozenset()
) -> list[Reason]:
    """Refuse keys that look like gpushare's but are not one a user writes.

    A key looks like gpushare's when its prefix (before ``/``; all of it without one) starts with
    ``gpushare``: ``gpushare.io/gpu_memory``, ``gpushare/gpu-memory``, ``gpushare.io.gpu-memory``;
    ``example.com/gpushare-enabled`` and ``tests.gpushare.io/x`` are someone else's. ``ours``:
    system annotations that may be there already (the webhook's own mark on a pod it is asked
    about again).
    """
    reasons = []
    for key in annotations:
        if key in USER_ANNOTATIONS or key in ours:
            continue
        if not key.split("/", 1)[0].lower().startswith("gpushare"):
            continue
        if key in names.SYSTEM_ANNOTATIONS:
            message = (
                f"{where}{key} is a system annotation, written by gpushare itself (where a pod is"
                " placed and what it was granted), never by users: remove it"
            )
            reasons.append(Reason("system-annotation", message))
            continue
        suggestion = suggest(key)
        hint = (
            f"did you mean {suggestion}?"
            if suggestion
            else f"gpushare reads only {', '.join(USER_ANNOTATIONS)}"
        )
        message = f"{where}unknown annotation {key!r}: {hint}"
        reasons.append(Reason("unknown-annotation", message))
    return reasons


def suggest(key: str) -> str | None:
    """The user annotation ``key`` was probably meant to be, if any is close."""
    normal = key.lower().replace("_", "-")
    by_name = {known.rsplit("/", 1)[-1]: known for known in USER_ANNOTATIONS}
    close = difflib.get_close_matches(normal.rsplit("/", 1)[-1], by_name, n=1, cutoff=_NAME_CUTOFF)
    if close:
        return by_name[close[0]]
    close = difflib.get_close_matches(normal, USER_ANNOTATIONS, n=1, cutoff=_KEY_CUTOFF)
    return close[0] if close else None


def annotations(
    values: Mapping[str, Any],
    *,
    settings: config.Settings,
    largest_cuda_total_bytes: int | None,
    where: str = "",
) -> Verdict:
    """Check every gpushare annotation of an object (keys and values)."""
    reasons = annotation_keys(values, where=where)
    warnings: list[str] = []
    if names.ANNOTATION_GPU_MEMORY in values:
        _, more, warned = memory_bytes(
            values[names.ANNOTATION_GPU_MEMORY],
            settings=settings,
            largest_cuda_total_bytes=largest_cuda_total_bytes,
        )
        reasons += [Reason(reason.code, where + reason.message) for reason in more]
        warnings += warned
    if names.ANNOTATION_POLICY in values:
        more = policy(values[names.ANNOTATION_POLICY])
        reasons += [Reason(reason.code, where + reason.message) for reason in more]
    if names.ANNOTATION_COMPUTE_SHARE in values:
        try:
            grants.compute_share(values[names.ANNOTATION_COMPUTE_SHARE])
        except errors.BadRequest as exc:
            reasons.append(Reason("bad-compute-share", where + str(exc)))
    return Verdict(tuple(reasons), tuple(warnings))


def inference_service(
    isvc: Mapping[str, Any],
    *,
    settings: config.Settings,
    largest_cuda_total_bytes: int | None,
    old: Mapping[str, Any] | None = None,
) -> Verdict:
    """Validate an InferenceService on CREATE (``old`` is None) or UPDATE.

    An UPDATE is refused only for problems it introduces: KServe's controller must still be able
    to update (and remove its finalizer from) an object admitted before the webhook or a smaller
    card changed the verdict.
    """
    metadata = _mapping(isvc.get("metadata"))
    if old is not None and metadata.get("deletionTimestamp"):
        return Verdict()
    verdict = _inference_service(
        isvc, settings=settings, largest_cuda_total_bytes=largest_cuda_total_bytes
    )
    if old is None or not verdict.reasons:
        return verdict
    before = _inference_service(
        old, settings=settings, largest_cuda_total_bytes=largest_cuda_total_bytes
    )
    known = {reason.message for reason in before.reasons}
    fresh = tuple(reason for reason in verdict.reasons if reason.message not in known)
    return Verdict(fresh, verdict.warnings)


def _inference_service(
    isvc: Mapping[str, Any], *, settings: config.Settings, largest_cuda_total_bytes: int | None
) -> Verdict:
    spec = _mapping(isvc.get("spec"))
    predictor = _mapping(spec.get("predictor"))
    reasons: list[Reason] = []
    warnings: list[str] = []
    # KServe copies both to the predictor's pods: each is checked, and either may carry the size.
    sources = (
        ("", _mapping(_mapping(isvc.get("metadata")).get("annotations"))),
        ("spec.predictor.annotations: ", _mapping(predictor.get("annotations"))),
    )
    for where, values in sources:
        verdict = annotations(
            values,
            settings=settings,
            largest_cuda_total_bytes=largest_cuda_total_bytes,
            where=where,
        )
        reasons += verdict.reasons
        warnings += verdict.warnings
    if not any(names.ANNOTATION_GPU_MEMORY in values for _, values in sources):
        return Verdict(tuple(reasons), tuple(warnings))
    wants_gpu = False
    for where, container in predictor_containers(predictor):
        count = gpu_count(container)
        wants_gpu = wants_gpu or count > 0
        reasons += container_reasons(where, container, gpus=count, holder=count > 0)
        reasons += other_gpu_reasons(where, container)
        more, warned = environment_reasons(where, container)
        reasons += more
        warnings += warned
    worker = _mapping(predictor.get("workerSpec"))
    if worker:
        message = (
            "spec.predictor.workerSpec spreads one server over several nodes; gpushare gives a"
            f" server a slice of one card: remove workerSpec or {names.ANNOTATION_GPU_MEMORY}"
        )
        reasons.append(Reason("multi-gpu", message))
    if not wants_gpu:
        warnings.append(
            f"gpushare: no predictor container requests {names.NVIDIA_GPU_RESOURCE}; keep"
            f" {names.NVIDIA_GPU_RESOURCE}: 1 (gpushare replaces it in the pod), or KServe may"
            " run a CPU image"
        )
    if names.ANNOTATION_GPU_MEMORY in sources[0][1]:
        for component in COMPONENTS:
            if _mapping(spec.get(component)):
                warnings.append(
                    f"gpushare: KServe copies {names.ANNOTATION_GPU_MEMORY} to the {component}'s"
                    f" pods too; they are left as they are unless a container there requests"
                    f" {names.NVIDIA_GPU_RESOURCE} (then it gets a slice of its own): to size the"
                    " predictor alone, move the annotation to spec.predictor.annotations"
                )
    return Verdict(tuple(reasons), tuple(warnings))


def container_reasons(
    where: str, container: Mapping[str, Any], *, gpus: int, holder: bool
) -> list[Reason]:
    """Refusals for the container of an annotated object that holds (``holder``) or asks for the
    GPU: GPU count, parallelism, vLLM's own sizing, its command line."""
    reasons = []
    if gpus > 1:
        message = (
            f"{where} asks for {gpus} GPUs ({names.NVIDIA_GPU_RESOURCE}: {gpus}); sharing gives a"
            f" server a slice of one card and several cards are not supported: use"
            f" {names.NVIDIA_GPU_RESOURCE}: 1, or remove {names.ANNOTATION_GPU_MEMORY} to get"
            f" {gpus} whole cards"
        )
        reasons.append(Reason("multi-gpu", message))
    plan = vllm.plan(container)
    argv = _strings(container.get("command")) + _strings(container.get("args"))
    parallel = vllm.parallel_sizes(argv) | plan.parallel
    for flag, value in parallel.items():
        if _integer(value) > 1:
            message = (
                f"{where} runs vLLM with {flag} {value}, which needs {value} GPUs; sharing gives a"
                f" server a slice of one card and that is not supported: use {flag} 1 (or drop"
                f" it), or remove {names.ANNOTATION_GPU_MEMORY} to use whole cards"
            )
            reasons.append(Reason("tensor-parallel", message))
    if plan.kv_cache is not None:
        message = (
            f"{where} gives vLLM {plan.kv_cache!r}; with it vLLM ignores"
            f" {names.VLLM_UTILIZATION_FLAG}, which gpushare sets to fit the grant, so the server"
            f" could outgrow its {names.ANNOTATION_GPU_MEMORY}: remove"
            f" {names.VLLM_KV_CACHE_FLAG} (the KV cache then gets what the grant leaves), or size"
            " the annotation and let gpushare set the utilization"
        )
        reasons.append(Reason("kv-cache", message))
    if plan.problem is not None and (holder or plan.runs_vllm):
        reasons.append(Reason("shell", f"{where}: {plan.problem}"))
    return reasons


def other_gpu_reasons(where: str, container: Mapping[str, Any]) -> list[Reason]:
    """Refuse NVIDIA resources other than ``nvidia.com/gpu`` (MIG slices, time-shared GPUs)."""
    resources = _mapping(container.get("resources"))
    others = sorted(
        {
            key
            for kind in ("limits", "requests")
            for key in _mapping(resources.get(kind))
            if isinstance(key, str)
            and key.startswith(names.NVIDIA_RESOURCE_PREFIX)
            and key != names.NVIDIA_GPU_RESOURCE
        }
    )
    if not others:
        return []
    message = (
        f"{where} asks for {', '.join(others)} beside {names.ANNOTATION_GPU_MEMORY}; a gpushare"
        f" node hands out memory on whole cards and offers no other GPU resource, so the pod"
        f" could never be placed: remove {', '.join(others)} (keep {names.NVIDIA_GPU_RESOURCE}: 1"
        f" on the server), or remove {names.ANNOTATION_GPU_MEMORY}"
    )
    return [Reason("other-gpu-resource", message)]


def environment_reasons(where: str, container: Mapping[str, Any]) -> tuple[list[Reason], list[str]]:
    """Refusals and warnings for environment that would override what gpushare sets.

    A name in ``env`` (a literal value or one from a ConfigMap or Secret) is seen and refused
    when it is one of :data:`gpushare.core.names.SYSTEM_ENV` or starts with one of
    :data:`gpushare.core.names.SYSTEM_ENV_PREFIXES`. ``envFrom`` names no keys: an entry whose
    ``prefix`` alone could start such a name is refused; one without a prefix is warned about,
    since the webhook cannot see the keys of the ConfigMap or Secret it reads.
    """
    reasons: list[Reason] = []
    warnings: list[str] = []
    for item in _list(container.get("env")):
        name = _mapping(item).get("name")
        if isinstance(name, str) and is_system_env(name):
            message = (
                f"{where} sets {name}, which gpushare sets for the container (a value in the pod"
                " spec would override the device plugin's and the grant's isolation): remove it"
            )
            reasons.append(Reason("system-env", message))
    for item in _list(container.get("envFrom")):
        source = _mapping(item)
        kind = "configMapRef" if "configMapRef" in source else "secretRef"
        origin = f"{kind[: -len('Ref')]} {_mapping(source.get(kind)).get('name', '')}".strip()
        prefix = source.get("prefix") or ""
        if not isinstance(prefix, str):
            continue
        if not prefix:
            warnings.append(
                f"gpushare: {where} takes variables from {origin}, whose names the webhook cannot"
                f" see; one named {_reserved_names()} there would override what gpushare sets:"
                " keep such keys out of it, or give envFrom a prefix"
            )
        elif could_make_system_env(prefix):
            message = (
                f"{where} takes variables from {origin} with prefix {prefix!r}, which can make"
                f" names gpushare sets itself ({_reserved_names()}): use a prefix that cannot,"
                " such as 'APP_'"
            )
            reasons.append(Reason("system-env", message))
    return reasons, warnings


def is_system_env(name: str) -> bool:
    """Whether ``name`` is a variable gpushare, MPS or the NVIDIA runtime reads from the grant."""
    return name in names.SYSTEM_ENV or name.startswith(names.SYSTEM_ENV_PREFIXES)


def could_make_system_env(prefix: str) -> bool:
    """Whether ``prefix`` followed by some key is a system variable."""
    return is_system_env(prefix) or any(
        reserved.startswith(prefix) for reserved in (*names.SYSTEM_ENV, *names.SYSTEM_ENV_PREFIXES)
    )


def _reserved_names() -> str:
    prefixed = [f"{prefix}*" for prefix in names.SYSTEM_ENV_PREFIXES]
    fixed = sorted(n for n in names.SYSTEM_ENV if not n.startswith(names.SYSTEM_ENV_PREFIXES))
    return ", ".join(prefixed + fixed)


def predictor_containers(predictor: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every container-like spec of a predictor, with where it is written."""
    for index, container in enumerate(_list(predictor.get("containers"))):
        name = _mapping(container).get("name", index)
        yield f"spec.predictor.containers[{name}]", _mapping(container)
    for key in ("model", *FRAMEWORKS):
        if isinstance(predictor.get(key), Mapping):
            yield f"spec.predictor.{key}", predictor[key]
    worker = _mapping(predictor.get("workerSpec"))
    for index, container in enumerate(_list(worker.get("containers"))):
        yield f"spec.predictor.workerSpec.containers[{index}]", _mapping(container)


def gpu_count(container: Mapping[str, Any]) -> int:
    """The ``nvidia.com/gpu`` a container asks for (the larger of limit and request)."""
    resources = _mapping(container.get("resources"))
    counts = [
        _integer(_mapping(resources.get(kind)).get(names.NVIDIA_GPU_RESOURCE))
        for kind in ("limits", "requests")
    ]
    return max(counts)


def _integer(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return 0


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: object) -> list[str]:
    return [item for item in _list(value) if isinstance(item, str)]
