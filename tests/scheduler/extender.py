"""``gpushare scheduler`` as a real process, and the real kube-scheduler pointed at it.

Shared by the tests under the real kube-scheduler and by the benchmarks that time it.
"""

import contextlib
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests import cluster

MANIFEST = (
    Path(__file__).resolve().parents[2] / "manifests" / "scheduler" / "kube-scheduler-config.yaml"
)
"""Our KubeSchedulerConfiguration: profile ``gpushare-scheduler`` calling the extender."""


class ExtenderProcess:
    """``gpushare scheduler`` on a fixed loopback port, which can be killed and started again."""

    def __init__(
        self,
        control_plane: cluster.ControlPlane,
        folder: Path,
        *,
        options: Sequence[str] = (),
    ) -> None:
        """``options`` go before the ``scheduler`` command (``--log-level=WARNING``)."""
        self.control_plane = control_plane
        self.folder = folder
        self.options = tuple(options)
        self.port = cluster.free_port()
        self.process: cluster.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/gpushare-scheduler"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.popen.pid

    def start(self) -> None:
        self.starts += 1
        self.process = cluster.Process(
            f"extender-{self.starts}",
            [
                sys.executable,
                "-m",
                "gpushare.cli",
                *self.options,
                "scheduler",
                f"--listen=127.0.0.1:{self.port}",
                f"--kubeconfig={self.control_plane.kubeconfig}",
            ],
            self.folder / f"extender-{self.starts}.log",
        )
        process = self.process

        url = f"http://127.0.0.1:{self.port}/readyz"
        cluster.wait_for(
            lambda: cluster.answers(url, process, 1), timeout=60, what="the extender's /readyz"
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.popen.kill()
        self.process.stop()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log(self) -> str:
        return cluster.tail(self.process.log_path, 80) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@contextlib.contextmanager
def started(
    control_plane: cluster.ControlPlane, folder: Path, *, options: Sequence[str] = ()
) -> Iterator[ExtenderProcess]:
    """An extender started for the block; its log is printed if the block fails."""
    process = ExtenderProcess(control_plane, folder, options=options)
    process.start()
    try:
        yield process
    except BaseException:
        print(process.log())
        raise
    finally:
        process.stop()


def scheduler_config(url: str) -> dict[str, Any]:
    """Our manifest, its extender URL pointed at the test's extender."""
    config: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    config["extenders"][0]["urlPrefix"] = url
    return config


@contextlib.contextmanager
def kube_scheduler(
    control_plane: cluster.ControlPlane, extender: ExtenderProcess
) -> Iterator[cluster.Scheduler]:
    """The real kube-scheduler on our manifest; both logs are printed if the block fails."""
    with control_plane.start_scheduler(scheduler_config(extender.url)) as scheduler:
        try:
            yield scheduler
        except BaseException:
            print(scheduler.log(80))
            print(extender.log())
            raise
