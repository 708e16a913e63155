"""The test kubelet (tests/deviceplugin/kubelet.py) in a process of its own, driven by lines.

``python -m tests.manifests.kubelet_process DIR`` serves kubelet's registration and PodResources
sockets under DIR and answers commands on stdin, one per line, with ``ok ...`` or ``error ...``:

- ``devices``: wait until a plugin registered and listed its devices; answer their count;
- ``admit NAMESPACE POD CONTAINER UNITS``: admit one container as kubelet does.

A process of its own keeps gRPC's threads out of the test process, which forks kube-scheduler and
kubectl: a fork while gRPC's poller runs can abort the child.
"""

import asyncio
import sys
from pathlib import Path

from tests.deviceplugin.kubelet import TestKubelet


async def _serve(root: Path) -> None:
    kubelet = TestKubelet(root)
    await kubelet.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ok ready", flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            try:
                print(f"ok {await _command(kubelet, line.split())}", flush=True)
            except Exception as exc:
                print(f"error {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
    finally:
        await kubelet.stop()


async def _command(kubelet: TestKubelet, words: list[str]) -> str:
    match words:
        case ["devices"]:
            await kubelet.wait_for(lambda: bool(kubelet.devices), timeout=30)
            return str(len(kubelet.devices))
        case ["admit", namespace, pod, container, units]:
            response = await kubelet.admit(namespace, pod, container, int(units))
            return ",".join(sorted(response.envs))
    raise ValueError(f"unknown command {' '.join(words)!r}")


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1])))
