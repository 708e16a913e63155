"""The Kubernetes connection of every part, found in one order, the one client-go's tools use:

1. the part's ``--kubeconfig`` flag, when given;
2. ``$KUBECONFIG`` (one file, or several joined with ``:``), when set;
3. the pod's service account, inside a pod (``KUBERNETES_SERVICE_HOST`` set);
4. ``~/.kube/config``.

kubernetes_asyncio reads the file (inline certificates, token files and exec plugins work); the
file is never written back.
"""

import os
from pathlib import Path
from typing import Final

import yaml
from kubernetes_asyncio import client, config

from gpushare.core import errors

DEFAULT_KUBECONFIG: Final = Path("~/.kube/config")
FLAG_HELP: Final = (
    "kubeconfig to use (default: $KUBECONFIG, else the pod's service account, else ~/.kube/config)"
)
"""The ``--kubeconfig`` flag's help, the same in every part."""


def source(kubeconfig: Path | None = None) -> str:
    """Where :func:`configuration` takes the connection from, in words."""
    if kubeconfig is not None:
        return f"kubeconfig {kubeconfig}"
    if os.environ.get("KUBECONFIG"):
        return f"kubeconfig {os.environ['KUBECONFIG']} ($KUBECONFIG)"
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "the pod's service account"
    return f"kubeconfig {DEFAULT_KUBECONFIG}"


async def configuration(kubeconfig: Path | None = None) -> client.Configuration:
    """The connection, in the order above.

    :class:`~gpushare.core.errors.ConfigError` names the source that failed.
    """
    where = source(kubeconfig)
    result = client.Configuration()
    try:
        if (
            kubeconfig is None
            and not os.environ.get("KUBECONFIG")
            and os.environ.get("KUBERNETES_SERVICE_HOST")
        ):
            config.load_incluster_config(client_configuration=result)  # type: ignore[no-untyped-call]
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
            files = [Path(p).expanduser() for p in str(path).split(os.pathsep) if p]
            if not any(f.is_file() for f in files):
                raise errors.ConfigError(f"cannot use {where}: no such file")
            await config.load_kube_config(
                config_file=os.pathsep.join(map(str, files)),
                client_configuration=result,
                persist_config=False,
            )
    except (config.ConfigException, yaml.YAMLError, OSError, ValueError, KeyError) as exc:
        raise errors.ConfigError(f"cannot use {where}: {exc}") from exc
    if not result.host:
        raise errors.ConfigError(f"cannot use {where}: it names no server")
    return result


async def api_client(kubeconfig: Path | None = None) -> client.ApiClient:
    """A kubernetes_asyncio client on :func:`configuration`."""
    return client.ApiClient(await configuration(kubeconfig))
