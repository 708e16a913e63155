"""The one error of every part's Kubernetes calls, and its one retry policy."""

import asyncio
import json
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.core import errors


class ApiError(errors.GpushareError):
    """The API refused a call (``status``), or could not be reached (``status`` 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def temporary(self) -> bool:
        """Whether the same call may succeed later: lost connections, 409 conflicts, 410 (list
        again), 429 and 5xx; any other refusal stays."""
        return self.status in (0, 409, 410, 429) or self.status >= 500

    @classmethod
    def from_status(cls, status: int, body: object) -> "ApiError":
        """From a ``Status`` object (or whatever text the answer held)."""
        if isinstance(body, dict):
            return cls(status, str(body.get("reason") or status), str(body.get("message") or ""))
        return cls(status, str(status), str(body)[:500])


class Translated:
    """``async with Translated("patch node n1"):`` turns kubernetes_asyncio's and aiohttp's
    errors into :class:`ApiError` naming the action."""

    def __init__(self, action: str) -> None:
        self._action = action

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, ApiException):
            raise ApiError(exc.status or 0, _reason(exc), self._action) from exc
        if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
            raise ApiError(0, "Unreachable", f"{self._action}: {exc!r}") from exc
        return False


def _reason(exc: ApiException) -> str:
    body: Any
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return str(exc.reason)
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(exc.reason)
