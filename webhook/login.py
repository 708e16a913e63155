"""Credentials for kopf: the kubeconfig named by ``--kubeconfig``, else ``KUBECONFIG`` (or
``~/.kube/config``), else the pod's service account."""

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import kopf
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config

from gpushare import errors

LoginFn = Callable[..., Awaitable[kopf.ConnectionInfo | None]]


def handler(kubeconfig: Path | None) -> LoginFn:
    """kopf's login handler: from ``kubeconfig`` when given, else from the environment or pod."""

    async def login(
        *, settings: kopf.OperatorSettings, **kwargs: Any
    ) -> kopf.ConnectionInfo | None:
        if kubeconfig is not None:
            return await from_kubeconfig(kubeconfig, trust_env=settings.networking.trust_env)
        info: kopf.ConnectionInfo | None = kopf.login_with_kubeconfig(settings=settings, **kwargs)
        return info or kopf.login_with_service_account(settings=settings, **kwargs)

    return login


async def from_kubeconfig(path: Path, *, trust_env: bool = False) -> kopf.ConnectionInfo:
    """The current context of the kubeconfig at ``path``; :class:`ConfigError` if it is unusable.

    kubernetes_asyncio reads the file, as for the scheduler and the device plugin, so inline
    certificates, token files and exec plugins work (kopf's own reader takes only
    ``KUBECONFIG``). Called again at each login, so an exec plugin's token is fetched afresh.
    """
    if not path.is_file():
        raise errors.ConfigError(f"cannot use kubeconfig {path}: no such file")
    configuration = client.Configuration()
    try:
        await kube_config.load_kube_config(
            config_file=str(path), client_configuration=configuration, persist_config=False
        )
    except (kube_config.ConfigException, yaml.YAMLError, OSError, ValueError, KeyError) as exc:
        raise errors.ConfigError(f"cannot use kubeconfig {path}: {exc}") from exc
    if not configuration.host:
        raise errors.ConfigError(f"cannot use kubeconfig {path}: its context names no server")
    header: str | None = await configuration.get_api_key_with_prefix("BearerToken")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        scheme=scheme or None,
        token=token or None,
        proxy_url=configuration.proxy,
        trust_env=trust_env,
    )
