"""The shared core: the pure functions and models every part speaks.

No Kubernetes client, no network, no NVML: names, quantities, the grant arithmetic, the allocation
codec, placement and the configuration that cross a process boundary live here, once.
"""
