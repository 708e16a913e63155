"""Glue: the Node watch (kopf) and the two admission routes. The decisions live elsewhere.

Each decision is logged once: a refusal at INFO with its reasons, a mutation at INFO with what
changed; values are escaped so that a newline in an object cannot forge a log line.
"""

import logging
from collections.abc import Mapping
from typing import Any, Final

import jsonpatch
import kopf

from gpushare.core import config, errors, names
from gpushare.core.ids import NodeName
from gpushare.webhook import inventory, mutation, paths, server, validation
from gpushare.webhook.metrics import WebhookMetrics
from gpushare.webhook.templates import Templates

logger = logging.getLogger(__name__)

DENIAL_CODE: Final = 403
"""The status of a refusal: kubectl prints ``Error from server (Forbidden)``."""


def register(registry: kopf.OperatorRegistry, *, cards: inventory.Cards) -> None:
    """Register the Node watch that feeds ``cards`` into ``registry``."""

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


def routes(
    *,
    settings: config.Settings,
    metrics: WebhookMetrics,
    cards: inventory.Cards,
    templates: Templates | None = None,
) -> dict[str, server.Route]:
    """The admission routes, by URL path (without its ``/``).

    ``templates`` creates the claim template a pod mutated for the DRA backend names (the
    configured backend, or :data:`paths.MUTATE_PODS_DRA`'s), except on a dry run; a template it
    cannot create refuses the pod.
    """

    def mutate_pods(chosen: config.Settings, path: str) -> server.Decide:
        async def mutate_pod(request: Mapping[str, Any]) -> server.Answer:
            body = request["object"]
            result = mutation.pod(body, settings=chosen, largest_cuda_total_bytes=cards.largest())
            if not result.allowed:
                return _deny(path, request, result, metrics)
            if result.patch and templates is not None and not request.get("dryRun"):
                mutated = jsonpatch.apply_patch(body, [dict(op) for op in result.patch])
                try:
                    await templates.ensure(mutated)
                except errors.Conflict as exc:
                    refusal = validation.Verdict(
                        reasons=(validation.Reason("claim-template", str(exc)),),
                        warnings=result.warnings,
                    )
                    return _deny(path, request, refusal, metrics)
            if result.patch:
                logger.info(
                    "pod %s mutated: %s",
                    server.describe(request),
                    server.printable("; ".join(result.warnings)),
                )
            return server.Answer(patch=result.patch, warnings=result.warnings)

        return mutate_pod

    async def validate_inference_service(request: Mapping[str, Any]) -> server.Answer:
        old = request.get("oldObject") if request["operation"] == "UPDATE" else None
        verdict = validation.inference_service(
            request["object"],
            settings=settings,
            largest_cuda_total_bytes=cards.largest(),
            old=old,
        )
        if not verdict.allowed:
            return _deny(paths.VALIDATE_INFERENCE_SERVICES, request, verdict, metrics)
        return server.Answer(warnings=verdict.warnings)

    return {
        paths.MUTATE_PODS: server.Route(
            ("", "v1", "pods"), frozenset({"CREATE"}), mutate_pods(settings, paths.MUTATE_PODS)
        ),
        paths.MUTATE_PODS_DRA: server.Route(
            ("", "v1", "pods"),
            frozenset({"CREATE"}),
            mutate_pods(settings.model_copy(update={"backend": "dra"}), paths.MUTATE_PODS_DRA),
        ),
        paths.VALIDATE_INFERENCE_SERVICES: server.Route(
            ("serving.kserve.io", "v1beta1", "inferenceservices"),
            frozenset({"CREATE", "UPDATE"}),
            validate_inference_service,
        ),
    }


def _deny(
    webhook: str,
    request: Mapping[str, Any],
    verdict: validation.Verdict,
    metrics: WebhookMetrics,
) -> server.Answer:
    for reason in verdict.reasons:
        metrics.denials.labels(webhook, reason.code).inc()
    message = verdict.message
    logger.info("/%s %s refused: %s", webhook, server.describe(request), server.printable(message))
    return server.Answer(
        allowed=False, code=DENIAL_CODE, message=message, warnings=verdict.warnings
    )
