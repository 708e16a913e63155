"""One error tree, named for what the caller does next.

::

    GpushareError
    ├── ConfigError       configuration is wrong: exit at start-up, naming the key
    ├── BadRequest        input is malformed: deny the admission or answer 4xx, saying what to write
    │   └── QuantityError a Kubernetes quantity does not parse or is not a memory size
    ├── NoFit             a request does not fit: a reason a person understands
    ├── Conflict          state changed under us (a card taken, a stale version): retry or roll back
    └── ReportVersionError a node report from a newer agent: ignore the node, never misread it
"""


class GpushareError(Exception):
    """Base of every error gpushare raises on purpose."""


class ConfigError(GpushareError):
    """The configuration is invalid; the message names the key and its allowed values."""


class BadRequest(GpushareError):
    """Malformed input: the message says what was wrong and what to write instead."""


class QuantityError(BadRequest):
    """A Kubernetes quantity that does not parse or is not a valid memory size."""


class NoFit(GpushareError):
    """A request fits nowhere it was asked to; the message is the reason."""


class Conflict(GpushareError):
    """Concurrent change: the operation was not applied and may be retried."""


class ReportVersionError(BadRequest):
    """A node report written by a newer agent than this reader understands."""
