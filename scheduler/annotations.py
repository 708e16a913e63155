"""The allocation annotations as the extender writes and reads them (the codec is the core's).

:func:`encode` and :func:`format_time` are :mod:`gpushare.core.allocations`';
:func:`decode` names the pod's memory-requesting containers from its parsed request.
"""

from collections.abc import Mapping

from gpushare.core import allocations
from gpushare.core.allocations import Allocation, encode, format_time
from gpushare.scheduler import demand

__all__ = ["decode", "encode", "format_time"]


def decode(
    annotations: Mapping[str, str], request: demand.PodRequest
) -> tuple[Allocation, ...] | None:
    """The allocations a bound pod's annotations record, or ``None`` when it carries none.

    Raises :class:`BadRequest` when they are present but do not parse.
    """
    return allocations.decode(annotations, [d.container for d in request.demands])
