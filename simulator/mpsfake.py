"""A stand-in for ``nvidia-cuda-mps-control``, so the device plugin's real MPS code path runs.

The plugin starts a daemon with ``-d`` and sends commands on stdin, as with NVIDIA's program. Here a
daemon is a small shell loop whose pid lands in the pipe directory (the plugin checks it is alive)
and that ends with the simulation; commands are appended to ``commands`` in the pipe directory,
where the simulated vLLM reads its daemon's default limit (``set_default_device_pinned_mem_limit``).
"""

import os
import re
import stat
from pathlib import Path
from typing import Final

from gpushare.core.quantities import GI, MI

COMMANDS: Final = "commands"
PID_FILE: Final = "nvidia-cuda-mps-control.pid"

_SCRIPT: Final = """#!/bin/sh
# nvidia-cuda-mps-control, as simulated by gpushare simulate.
pipe="${{CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}}"
if [ "$1" = "-d" ]; then
    mkdir -p "$pipe"
    (while kill -0 {owner} 2>/dev/null && [ -d "$pipe" ]; do sleep 5; done) >/dev/null 2>&1 &
    echo $! > "$pipe/{pid_file}"
    exit 0
fi
while IFS= read -r line; do
    case "$line" in
        quit)
            if [ -f "$pipe/{pid_file}" ]; then kill "$(cat "$pipe/{pid_file}")" 2>/dev/null; fi
            rm -f "$pipe/{pid_file}" ;;
        *) printf '%s\\n' "$line" >> "$pipe/{commands}" ;;
    esac
done
"""

_LIMIT: Final = re.compile(r"^set_default_device_pinned_mem_limit\s+\S+\s+(\d+)([MG])\s*$")


def install(folder: Path) -> Path:
    """Write the program into ``folder``; its daemons end when this process does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvidia-cuda-mps-control"
    path.write_text(
        _SCRIPT.format(owner=os.getpid(), pid_file=PID_FILE, commands=COMMANDS)
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def daemon_pid(pipe: Path) -> int | None:
    """The pid of the daemon serving ``pipe``, if one was started and not quit."""
    try:
        return int((pipe / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def running(pipe: Path) -> bool:
    """Whether the pipe directory's daemon runs (without one, MPS limits are silently ignored)."""
    pid = daemon_pid(pipe)
    return pid is not None and Path(f"/proc/{pid}").exists()


def default_limit_bytes(pipe: Path) -> int | None:
    """The daemon's default pinned-memory limit, as last set, or ``None``."""
    try:
        lines = (pipe / COMMANDS).read_text().splitlines()
    except OSError:
        return None
    limit = None
    for line in lines:
        if match := _LIMIT.match(line):
            limit = int(match[1]) * (GI if match[2] == "G" else MI)
    return limit
