"""A minimal JSON client of the Kubernetes REST API (dicts in, dicts out), over TLS.

Synchronous on purpose: one HTTPS request per call, safe to share across threads; asynchronous
callers run it in a thread. Used by ``gpushare simulate`` against a real kube-apiserver, and by the
tests.
"""

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["PATCH_TYPES", "ApiError", "Rest"]

PATCH_TYPES: Final = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


class ApiError(RuntimeError):
    """The apiserver answered with an error status; ``body`` is its Status object (or text)."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")

    @property
    def reason(self) -> str:
        """``Status.reason``: NotFound, AlreadyExists, Forbidden, Invalid, Conflict..."""
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else str(self.body)


class Rest:
    """A minimal JSON client of the Kubernetes REST API: dicts in, dicts out.

    Paths are the API's own (``/api/v1/namespaces/ns/pods``). Each call opens one HTTPS request
    (loopback, cheap); safe to share across threads.
    """

    def __init__(self, base_url: str, context: ssl.SSLContext, *, token: str | None = None) -> None:
        self.base_url = base_url
        self.context = context
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str | int | bool] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one request; return the decoded JSON answer ({} if empty); raise ApiError."""
        url = self.base_url + path
        if params:
            query = {
                k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()
            }
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                error_body: Any = json.loads(text)
            except json.JSONDecodeError:
                error_body = text
            raise ApiError(method, path, exc.code, error_body) from None
        if not raw:
            return {}
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    def get(self, path: str, **params: str | int | bool) -> dict[str, Any]:
        return self.request("GET", path, params=params)

    def create(
        self, path: str, body: Mapping[str, Any], **params: str | int | bool
    ) -> dict[str, Any]:
        """POST ``body`` to a collection path (``params``: e.g. ``dryRun="All"``)."""
        return self.request("POST", path, dict(body), params=params)

    def replace(
        self, path: str, body: Mapping[str, Any], **params: str | int | bool
    ) -> dict[str, Any]:
        return self.request("PUT", path, dict(body), params=params)

    def patch(
        self,
        path: str,
        body: Any,
        patch_type: str = "merge",
        **params: str | int | bool,
    ) -> dict[str, Any]:
        """PATCH with ``patch_type`` merge, strategic, json or apply (apply needs fieldManager)."""
        return self.request(
            "PATCH", path, body, content_type=PATCH_TYPES[patch_type], params=params
        )

    def delete(self, path: str, **params: str | int | bool) -> dict[str, Any]:
        return self.request("DELETE", path, params=params)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
