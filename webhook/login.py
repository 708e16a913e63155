"""kopf's credentials, from the connection every part uses (:mod:`gpushare.runtime.connection`:
``--kubeconfig``, ``$KUBECONFIG``, the pod's service account, ``~/.kube/config``)."""

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import kopf

from gpushare.runtime import connection

LoginFn = Callable[..., Awaitable[kopf.ConnectionInfo | None]]


def handler(kubeconfig: Path | None) -> LoginFn:
    """kopf's login handler; called again at each login, so tokens are read afresh."""

    async def login(
        *, settings: kopf.OperatorSettings, **kwargs: Any
    ) -> kopf.ConnectionInfo | None:
        return await connection_info(kubeconfig, trust_env=settings.networking.trust_env)

    return login


async def connection_info(
    kubeconfig: Path | None = None, *, trust_env: bool = False
) -> kopf.ConnectionInfo:
    """The connection as kopf takes it; :class:`~gpushare.core.errors.ConfigError` if unusable."""
    configuration = await connection.configuration(kubeconfig)
    header: str | None = await configuration.get_api_key_with_prefix("BearerToken")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        scheme=scheme or None,
        token=token or None,
        proxy_url=configuration.proxy,
        trust_env=trust_env,
    )
