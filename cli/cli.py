"""The ``gpushare`` command: one subcommand per part, each handed to ``gpushare.<part>.main``.

A part's module is imported only when its subcommand runs, so ``gpushare estimate`` does not pay
for kopf or grpc. Each ``main`` module offers ``add_arguments(parser)`` and ``run(args) -> int``.
"""

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Final, Protocol

from gpushare import __version__
from gpushare.core import errors

PARTS: Final = {
    "scheduler": ("gpushare.scheduler.main", "the kube-scheduler extender"),
    "webhook": ("gpushare.webhook.main", "the admission webhook for InferenceServices and Pods"),
    "device-plugin": ("gpushare.deviceplugin.main", "the kubelet device plugin and GPU agent"),
    "certs": ("gpushare.webhook.certs", "make a self-signed CA and serving pair"),
    "simulate": ("gpushare.simulator.main", "the whole system on one machine: a capacity planner"),
    "estimate": ("gpushare.simulator.estimate", "the GPU memory a vLLM model needs"),
}


class PartMain(Protocol):
    """What a part's ``main`` module offers the CLI."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpushare",
        description="Share one NVIDIA GPU between several vLLM servers on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"gpushare {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level (default INFO)",
    )
    parts = parser.add_subparsers(dest="part", metavar="PART", required=True)
    for name, (_, summary) in PARTS.items():
        parts.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpushare`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top, rest = _top_parser().parse_known_args(argv)
    logging.basicConfig(
        level=top.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module_name, summary = PARTS[top.part]
    try:
        part: PartMain = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        print(f"gpushare {top.part}: this part is not built yet", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"gpushare {top.part}", description=summary)
    part.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return part.run(args)
    except errors.GpushareError as exc:
        print(f"gpushare {top.part}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
