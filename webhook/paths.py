"""The URL paths of the two admission webhooks, as the configurations in ``manifests/webhook/`` call
them (``/mutate-pods``, ``/validate-inferenceservices``).

The admission server routes a request by its path, without the leading ``/``. This module imports
nothing, so that callers of the webhook (the simulator's apiserver, benchmarks) share the names
without loading the webhook's server or kopf.
"""

from typing import Final

MUTATE_PODS: Final = "mutate-pods"
MUTATE_PODS_DRA: Final = "mutate-pods-dra"
"""The pods of namespaces labelled ``gpushare.io/backend: dra`` in a cluster that runs both
backends (``manifests/overlays/mixed``): the DRA backend's output whatever is configured."""
VALIDATE_INFERENCE_SERVICES: Final = "validate-inferenceservices"
