"""kopf glue: the Node watch and the two admission handlers. The decisions live elsewhere.

Handler ids are the URL paths the webhook configurations call (:mod:`.paths`): kopf routes a
request to the handler named by its path.
"""

import logging
from collections.abc import Mapping
from typing import Any, Final

import jsonpatch
import kopf

from gpushare import config, errors, names
from gpushare.ids import NodeName
from gpushare.webhook import inventory, mutation, paths, server, validation
from gpushare.webhook.metrics import WebhookMetrics
from gpushare.webhook.templates import Templates

logger = logging.getLogger(__name__)

DENIAL_CODE: Final = 403
"""The status of a refusal: kubectl prints ``Error from server (Forbidden)``."""


def register(
    registry: kopf.OperatorRegistry,
    *,
    settings: config.Settings,
    metrics: WebhookMetrics,
    cards: inventory.Cards,
    templates: Templates | None = None,
) -> None:
    """Register the Node watch and the admission handlers into ``registry``.

    ``templates`` (the DRA backend) creates the claim template a mutated pod names.
    """

    @kopf.on.event("v1", "nodes", registry=registry)
    async def watch_node(
        type: str | None,
        name: str,
        annotations: Mapping[str, str],
        **_: Any,
    ) -> None:
        if type == "DELETED":
            cards.forget(NodeName(name))
        else:
            cards.update(NodeName(name), annotations.get(names.ANNOTATION_NODE_REPORT))

    @kopf.on.validate(  # type: ignore[arg-type]  # kopf's protocol lacks old and operation
        "serving.kserve.io",
        "v1beta1",
        "inferenceservices",
        id=paths.VALIDATE_INFERENCE_SERVICES,
        operations=["CREATE", "UPDATE"],
        registry=registry,
    )
    async def validate_inference_service(
        body: kopf.Body,
        old: kopf.Body | None,
        operation: str,
        warnings: list[str],
        **_: Any,
    ) -> None:
        verdict = validation.inference_service(
            body,
            settings=settings,
            largest_cuda_total_bytes=cards.largest(),
            old=old if operation == "UPDATE" else None,
        )
        warnings.extend(verdict.warnings)
        if not verdict.allowed:
            _deny(paths.VALIDATE_INFERENCE_SERVICES, body, verdict.reasons, metrics)

    @kopf.on.mutate("v1", "pods", id=paths.MUTATE_PODS, operations=["CREATE"], registry=registry)
    async def mutate_pod(
        body: kopf.Body, patch: kopf.Patch, warnings: list[str], dryrun: bool, **_: Any
    ) -> None:
        result = mutation.pod(body, settings=settings, largest_cuda_total_bytes=cards.largest())
        warnings.extend(result.warnings)
        if not result.allowed:
            _deny(paths.MUTATE_PODS, body, result.reasons, metrics)
        if result.patch:
            ops = [dict(op) for op in result.patch]
            if templates is not None and not dryrun:
                await _ensure_template(templates, body, ops, metrics)
            if not server.offer_patch(ops):  # kopf's own server: it diffs the patched copy
                patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
            logger.info("pod %s: %s", _describe(body), "; ".join(result.warnings))


async def _ensure_template(
    templates: Templates,
    body: Mapping[str, Any],
    ops: list[dict[str, Any]],
    metrics: WebhookMetrics,
) -> None:
    try:
        await templates.ensure(jsonpatch.apply_patch(body, ops))
    except errors.Conflict as exc:
        reason = validation.Reason("claim-template", str(exc))
        _deny(paths.MUTATE_PODS, body, (reason,), metrics)


def _deny(
    webhook: str,
    body: Mapping[str, Any],
    reasons: tuple[validation.Reason, ...],
    metrics: WebhookMetrics,
) -> None:
    for reason in reasons:
        metrics.denials.labels(webhook, reason.code).inc()
    message = "; ".join(reason.message for reason in reasons)
    logger.info("%s %s refused: %s", webhook, _describe(body), message)
    raise kopf.AdmissionError(message, code=DENIAL_CODE)


def _describe(body: Mapping[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    name = metadata.get("name") or f"{metadata.get('generateName') or ''}*"
    return f"{metadata.get('namespace') or '-'}/{name}"
