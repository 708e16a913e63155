"""gpushare: several vLLM servers on one NVIDIA GPU, each with a driver-enforced memory grant.

This package is the shared core: pure functions and models every part speaks (no Kubernetes
client, no network, no NVML).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpushare")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
