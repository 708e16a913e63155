"""The workload: InferenceServices as users write them, read from YAML files or built in.

A trace is a list of :class:`Service`. ``--trace FILE|DIR`` reads every ``*.yaml``/``*.yml`` (a
folder in name order, each file possibly holding several documents); each document must be a
KServe InferenceService that carries a ``gpushare.io/`` annotation. The annotation's value is not
judged here: the webhook's validating admission does that, as in a cluster.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from gpushare.core import errors, names, quantities

Manifest = dict[str, Any]

ISVC_API_VERSION: Final = "serving.kserve.io/v1beta1"
ISVC_KIND: Final = "InferenceService"
DEFAULT_NAMESPACE: Final = "default"
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH: Final = 45
"""KServe's limit: the name gets ``-predictor-<hash>`` suffixes and must stay a DNS label."""


@dataclass(frozen=True, slots=True)
class Service:
    """One InferenceService of the trace."""

    manifest: Manifest
    source: str
    """Where it came from (``trace.yaml#3`` or ``built-in``), for messages."""
    label: str = ""
    """What it runs, for people (``Llama-3.1-8B bf16, 8k ctx, 64 seqs``)."""
    minimum_budget_bytes: int | None = None
    """What vLLM needs inside its budget to start, where known: weights, activations, CUDA
    graphs and the KV cache of one sequence of ``--max-model-len`` tokens."""

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.manifest["metadata"].get("namespace") or DEFAULT_NAMESPACE)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def annotation(self) -> str | None:
        value = (self.manifest["metadata"].get("annotations") or {}).get(
            names.ANNOTATION_GPU_MEMORY
        )
        return None if value is None else str(value)

    @property
    def requested_bytes(self) -> int | None:
        """The annotation in bytes, or ``None`` where it does not parse (admission will say why)."""
        if self.annotation is None:
            return None
        try:
            return quantities.parse_bytes(self.annotation)
        except errors.QuantityError:
            return None

    def renamed(self, name: str) -> "Service":
        """A copy under another name (churn arrivals reuse the trace's services)."""
        manifest = {**self.manifest, "metadata": {**self.manifest["metadata"], "name": name}}
        return Service(manifest, self.source, self.label, self.minimum_budget_bytes)


def load(path: Path) -> list[Service]:
    """Read a trace file or folder; anything that is not a usable InferenceService is BadRequest."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise errors.BadRequest(f"--trace {path}: the folder holds no .yaml or .yml files")
    elif path.is_file():
        files = [path]
    else:
        raise errors.BadRequest(f"--trace {path}: no such file or folder")
    services: list[Service] = []
    for file in files:
        services.extend(_load_file(file))
    if not services:
        raise errors.BadRequest(f"--trace {path}: no InferenceService found")
    check_unique(services)
    return services


def _load_file(file: Path) -> Iterable[Service]:
    try:
        documents = list(yaml.safe_load_all(file.read_text()))
    except OSError as exc:
        raise errors.BadRequest(f"cannot read trace file {file}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise errors.BadRequest(f"trace file {file} is not YAML: {_yaml_problem(exc)}") from exc
    for position, document in enumerate(documents, start=1):
        if document is None:
            continue
        where = f"{file.name}#{position}"
        items = document.get("items") if isinstance(document, Mapping) else None
        if isinstance(document, Mapping) and document.get("kind") == "List" and items is not None:
            for index, item in enumerate(items if isinstance(items, list) else [items]):
                yield parse(item, source=f"{where}.items[{index}]")
        else:
            yield parse(document, source=where)


def parse(document: object, *, source: str) -> Service:
    """Check one document is an InferenceService worth simulating."""
    if not isinstance(document, Mapping):
        raise errors.BadRequest(
            f"{source}: expected an InferenceService mapping, got {document!r:.60}"
        )
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind != ISVC_KIND or not str(api_version).startswith("serving.kserve.io/"):
        raise errors.BadRequest(
            f"{source}: kind {kind!r} ({api_version}) is not an InferenceService;"
            f" write apiVersion: {ISVC_API_VERSION}, kind: {ISVC_KIND}"
        )
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
        raise errors.BadRequest(f"{source}: the InferenceService has no metadata.name")
    name = metadata["name"]
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise errors.BadRequest(
            f"{source}: name {name!r} must be lower-case letters, digits and '-', at most"
            f" {MAX_NAME_LENGTH} characters"
        )
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping) or not any(
        str(key).startswith(f"{names.DOMAIN}/") for key in annotations
    ):
        raise errors.BadRequest(
            f"{source}: InferenceService {name!r} has no {names.ANNOTATION_GPU_MEMORY} annotation;"
            f' add e.g. {names.ANNOTATION_GPU_MEMORY}: "20Gi" under metadata.annotations'
        )
    predictor = (document.get("spec") or {}).get("predictor")
    if not isinstance(predictor, Mapping) or not (
        predictor.get("containers") or predictor.get("model")
    ):
        raise errors.BadRequest(
            f"{source}: InferenceService {name!r} has no spec.predictor.containers or"
            " spec.predictor.model"
        )
    manifest: Manifest = yaml.safe_load(yaml.safe_dump(dict(document)))  # a plain deep copy
    manifest["metadata"].setdefault("namespace", DEFAULT_NAMESPACE)
    return Service(manifest, source, _label(manifest))


def check_unique(services: Iterable[Service]) -> None:
    """Two services of one name in one namespace would collide in the API."""
    seen: dict[str, str] = {}
    for service in services:
        if service.key in seen:
            raise errors.BadRequest(
                f"{service.source}: InferenceService {service.key} is already defined at"
                f" {seen[service.key]}"
            )
        seen[service.key] = service.source


def _label(manifest: Manifest) -> str:
    predictor = manifest["spec"]["predictor"]
    containers = predictor.get("containers") or [predictor.get("model") or {}]
    args = [str(a) for c in containers if isinstance(c, Mapping) for a in c.get("args") or []]
    for i, arg in enumerate(args):
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1]
    uri = (predictor.get("model") or {}).get("storageUri")
    return str(uri) if uri else str(manifest["metadata"]["name"])


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
