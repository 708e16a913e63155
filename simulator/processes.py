"""The parts' processes: ``gpushare <part> ...`` command lines, forked from a warm server.

Each part is a process of its own running the ``gpushare`` command's entry point with the
command line a cluster gives it. Importing a part (kubernetes_asyncio, kopf, grpc) costs seconds
of CPU, so the processes come from a fork server that imported the parts once
(``multiprocessing``'s ``forkserver`` with a preload list): ten device plugins start in the time
of one. The fork server runs no event loop and opens no gRPC channel, so forking from it is safe;
it ends with this process.
"""

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

PRELOAD: Final = (
    "gpushare.cli",
    "gpushare.scheduler.main",
    "gpushare.webhook.main",
    "gpushare.deviceplugin.main",
)
"""The parts' entry modules, imported once by the fork server."""


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def warm_up() -> None:
    """Start the fork server now, so its imports overlap with this process's own work."""
    _context()
    multiprocessing.forkserver.ensure_running()


def _main(argv: Sequence[str], env: Mapping[str, str], log: str) -> None:
    """In the child: the environment, stdout and stderr to the log, then ``gpushare <argv>``."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from gpushare import cli  # noqa: PLC0415 - preloaded by the fork server

    sys.exit(cli.main(list(argv)))


class Part:
    """One part's process."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        self._process = _context().Process(
            target=_main, args=(self.argv, self.env, str(self.log)), name=self.name, daemon=False
        )
        self._process.start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """SIGTERM, as kubelet stops a container."""
        if self.running():
            assert self._process is not None
            self._process.terminate()

    def reap(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the exit, then SIGKILL."""
        if self._process is None:
            return
        self._process.join(max(0.0, timeout))
        if self._process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.join()
