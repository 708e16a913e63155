"""The embedded API server's one error: a Kubernetes ``Status`` with its HTTP code."""

from typing import Any

__all__ = ["ApiError"]

Obj = dict[str, Any]


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
