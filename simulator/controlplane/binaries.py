"""Where the control plane's binaries are: etcd, kube-apiserver, kube-scheduler and kubectl.

``tests/controlplane/build.sh`` builds them from Kubernetes' own Go source into
``${GPUSHARE_CONTROLPLANE_CACHE:-~/.cache/gpushare/controlplane}/<k8s>-etcd<etcd>`` (e.g.
``v1.36.3-etcd3.6.8``); ``$GPUSHARE_CONTROLPLANE_BIN`` names a folder directly.
"""

import os
from pathlib import Path
from typing import Final

from gpushare.core import errors, names

__all__ = ["BINARIES", "BinariesMissingError", "built", "cache", "find"]

BINARIES: Final = ("etcd", "kube-apiserver", "kube-scheduler", "kubectl")


class BinariesMissingError(errors.ConfigError):
    """The control-plane binaries are not built (run ``tests/controlplane/build.sh``)."""


def cache() -> Path:
    """The folder build.sh fills, one subfolder per version."""
    explicit = os.environ.get(names.ENV_CONTROLPLANE_CACHE)
    return Path(explicit) if explicit else Path.home() / ".cache" / "gpushare" / "controlplane"


def _missing(folder: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(folder / b, os.X_OK)]


def find(version: str | None = None) -> Path:
    """The folder of the binaries: ``$GPUSHARE_CONTROLPLANE_BIN``, else the cache's ``version``
    (``v1.36.3-etcd3.6.8``), else its newest complete build.

    Raises :class:`BinariesMissingError`, saying how to build them, when any binary is absent.
    """
    explicit = os.environ.get(names.ENV_CONTROLPLANE_BIN)
    if explicit:
        folder = Path(explicit)
    elif version is not None:
        folder = cache() / version
    else:
        found = built()
        if found is None:
            raise BinariesMissingError(
                f"control plane not built: run tests/controlplane/build.sh (nothing in {cache()})"
            )
        return found
    missing = _missing(folder)
    if missing:
        raise BinariesMissingError(
            f"control plane not built: run tests/controlplane/build.sh"
            f" ({', '.join(missing)} missing in {folder})"
        )
    return folder


def built() -> Path | None:
    """The newest complete build in the cache (or ``$GPUSHARE_CONTROLPLANE_BIN``), if any."""
    explicit = os.environ.get(names.ENV_CONTROLPLANE_BIN)
    if explicit:
        return None if _missing(Path(explicit)) else Path(explicit)
    try:
        folders = [f for f in cache().iterdir() if f.is_dir() and not _missing(f)]
    except OSError:
        return None
    return max(folders, key=lambda f: f.stat().st_mtime, default=None)
