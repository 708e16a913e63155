"""The vLLM stand-in of the `node` tests' image: vLLM's start-up checks, run inside a container.

Run as the container's entrypoint with vLLM's arguments (as kubelet expanded them). It reads the
card it was given (``GPUSHARE_CARD_UUID``) in the fake NVML file named by ``$STANDIN_NVML_FILE``
(mounted from the host), applies :func:`gpushare.simulator.vllm.start` under the MPS limit in its
environment, and prints one JSON line: its argv, the gpushare environment it got, and ``started`` or
``refused`` with vLLM's message. Refused, it exits 1 (as vLLM does); started, it answers HTTP on
vLLM's ``--port`` (8000 by default; 200 on every GET, so readiness probes pass) until SIGTERM.
"""

import http.server
import json
import os
import signal
import sys
from pathlib import Path
from typing import Final

from gpushare.core import names
from gpushare.deviceplugin.nvml import FakeNvml
from gpushare.simulator import vllm

ENV_NVML = "STANDIN_NVML_FILE"
DEFAULT_PORT: Final = 8000
"""vLLM's own default ``--port``."""


def port(words: list[str]) -> int:
    """The ``--port`` among vLLM's arguments (``--port 8080`` or ``--port=8080``)."""
    for index, word in enumerate(words):
        if word == "--port" and index + 1 < len(words):
            return int(words[index + 1])
        if word.startswith("--port="):
            return int(word.removeprefix("--port="))
    return DEFAULT_PORT


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> int:
    words = sys.argv[1:]
    env = dict(os.environ)
    card = env.get(names.ENV_CARD_UUID, "")
    readings = {str(c.uuid): c for c in FakeNvml(path=Path(env[ENV_NVML])).snapshot().cards}
    line: dict[str, object] = {
        "argv": words,
        "env": {k: v for k, v in env.items() if k in names.SYSTEM_ENV},
    }
    reading = readings.get(card)
    if reading is None:
        outcome: vllm.Started | vllm.Refused = vllm.Refused(f"no card {card!r} is visible")
    else:
        outcome = vllm.start(
            words,
            card_free_bytes=reading.free_bytes,
            cuda_total_bytes=reading.cuda_total_bytes,
            limit_bytes=vllm.mps_limit_bytes(env, card),
        )
    if isinstance(outcome, vllm.Refused):
        line |= {"result": "refused", "message": outcome.message}
        print(json.dumps(line), flush=True)
        return 1
    line |= {"result": "started", "utilization": str(outcome.utilization)}
    print(json.dumps(line), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    http.server.ThreadingHTTPServer(("", port(words)), _Healthy).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
