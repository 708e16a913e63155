"""The ResourceClaimTemplates DRA pods name: created by the webhook, one per size and namespace.

A pod rewritten for the DRA backend takes its claim from the template of its grant's size
(:func:`gpushare.core.dra.claim_template`). Before the webhook answers, it creates that template
in the pod's namespace (an existing one is fine), so kube-controller-manager finds it when it
makes the pod's claim. Never on a dry run: the webhook configuration declares ``sideEffects:
NoneOnDryRun``. A template the webhook cannot create refuses the pod, saying why; the controller
that made the pod tries again.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.core import config, dra, errors, names
from gpushare.runtime import connection

REQUEST_SECONDS: Final = 2
"""The apiserver waits 5 s for the webhook (``timeoutSeconds``); the create takes at most 2."""

_GROUP, _VERSION = names.DRA_API_VERSION.split("/")


class Templates:
    """Creates claim templates through the Kubernetes API."""

    def __init__(self, api_client: client.ApiClient, settings: config.Settings) -> None:
        self._client = api_client
        self._objects = client.CustomObjectsApi(api_client)
        self._settings = settings

    @classmethod
    async def connect(cls, kubeconfig: Path | None, settings: config.Settings) -> "Templates":
        """From the connection :mod:`gpushare.runtime.connection` finds."""
        return cls(await connection.api_client(kubeconfig), settings)

    async def close(self) -> None:
        await self._client.close()

    async def ensure(self, pod: Mapping[str, Any]) -> None:
        """Create the template the (mutated) pod names; :class:`Conflict` if that fails."""
        template = needed(pod, self._settings)
        if template is None:
            return
        namespace, name = template["metadata"]["namespace"], template["metadata"]["name"]
        try:
            await self._objects.create_namespaced_custom_object(
                _GROUP,
                _VERSION,
                namespace,
                "resourceclaimtemplates",
                template,
                _request_timeout=REQUEST_SECONDS,
            )
        except ApiException as exc:
            if exc.status == 409:
                return
            raise errors.Conflict(
                f"cannot create ResourceClaimTemplate {namespace}/{name} for the pod's"
                f" {names.DRA_CLAIM_NAME} claim: {exc.status} {_message(exc)}"
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise errors.Conflict(
                f"cannot create ResourceClaimTemplate {namespace}/{name}: the API server did not"
                f" answer ({exc or type(exc).__name__}); try again"
            ) from exc


def needed(pod: Mapping[str, Any], settings: config.Settings) -> dict[str, Any] | None:
    """The template a mutated pod names, built from its grant; ``None`` if it names none."""
    spec = pod.get("spec") or {}
    metadata = pod.get("metadata") or {}
    entry = next(
        (c for c in spec.get("resourceClaims") or [] if c.get("name") == names.DRA_CLAIM_NAME),
        None,
    )
    units = (metadata.get("annotations") or {}).get(names.ANNOTATION_MUTATED)
    if entry is None or units is None:
        return None
    template = dra.claim_template(
        str(metadata.get("namespace") or "default"),
        int(units) * settings.unit_bytes,
        unit_bytes=settings.unit_bytes,
        overhead_bytes=settings.allocation_overhead_bytes,
    )
    if template["metadata"]["name"] != entry.get("resourceClaimTemplateName"):
        return None  # not a template of ours: the pod's own
    return template


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "").get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
