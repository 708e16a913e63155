"""gpushare: several vLLM servers on one NVIDIA GPU, each with a driver-enforced memory grant.

The package root holds the version and the command line (``gpushare.cli``); the shared core is
``gpushare.core``, the runtime plumbing ``gpushare.runtime``, and each part its own subpackage.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpushare")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
