"""The URL paths of the two admission webhooks, as the configurations in ``manifests/webhook/`` call
them (``/mutate-pods``, ``/validate-inferenceservices``).

The admission server routes a request by its path, without the leading ``/``. This module imports
nothing, so that callers of the webhook (the simulator's apiserver, benchmarks) share the names
without loading the webhook's server or kopf.
"""

from typing import Final

MUTATE_PODS: Final = "mutate-pods"
VALIDATE_INFERENCE_SERVICES: Final = "validate-inferenceservices"
