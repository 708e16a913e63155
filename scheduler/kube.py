"""The Kubernetes API as the extender uses it: JSON dicts in and out, one error type.

Built on ``kubernetes_asyncio`` for its configuration loading (kubeconfig or in-cluster, TLS,
tokens), but requests go out as plain JSON: the extender reads pods into its own models, which is
much cheaper than the generated classes for the tens of thousands of pods a list returns. Errors
of the client and of aiohttp stop here and become :class:`~gpushare.runtime.errors.ApiError`.
"""

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import pydantic_core
from kubernetes_asyncio import client

from gpushare.runtime import connection
from gpushare.runtime.errors import ApiError

__all__ = ["ApiError", "Kube"]

_JSON: Final = {"Accept": "application/json", "Content-Type": "application/json"}


class Kube:
    """A connection to the Kubernetes API.

    Configuration (server, TLS, credentials and their refresh) comes from ``kubernetes_asyncio``;
    requests go through one aiohttp session of our own without ``trust_env``: the client's own
    session looks up ``~/.netrc`` in a thread on every request, which costs a millisecond a bind.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        configuration = api.configuration
        self._host = str(configuration.host).rstrip("/")
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, keyfile=configuration.key_file)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._server_hostname = configuration.tls_server_name
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=context, limit=configuration.connection_pool_maxsize
            ),
            # A watch event carries a whole object; etcd allows objects up to 1.5 MiB.
            read_bufsize=2**21,
        )

    @classmethod
    async def connect(cls, kubeconfig: Path | None = None) -> "Kube":
        """From the connection :mod:`gpushare.runtime.connection` finds."""
        return cls(await connection.api_client(kubeconfig))

    async def close(self) -> None:
        await self._session.close()
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: object = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one request and return its JSON answer; raise :class:`ApiError`."""
        response = await self._send(
            method, path, params=params, body=body, timeout=aiohttp.ClientTimeout(total=timeout)
        )
        async with response:
            try:
                raw = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApiError(0, "Unreachable", f"{method} {path}: {exc!r}") from exc
            try:
                decoded = json.loads(raw) if raw else {}
            except ValueError:
                decoded = raw.decode(errors="replace")
            if response.status >= 300:
                raise ApiError.from_status(response.status, decoded)
            if not isinstance(decoded, dict):
                raise ApiError(response.status, "BadResponse", f"{method} {path}: not JSON object")
            return decoded

    async def watch(
        self, path: str, params: Mapping[str, str | int], *, timeout_seconds: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it.

        An ``ERROR`` event is yielded like the others: it carries a ``Status`` (410 Gone means
        the resource version is too old and the caller must list again).
        """
        query = {**params, "watch": "true", "timeoutSeconds": timeout_seconds}
        # The server closes the stream after timeout_seconds; the read timeout only catches a
        # connection that went silent without closing.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_seconds + 30)
        response = await self._send("GET", path, params=query, timeout=timeout)
        async with response:
            if response.status >= 300:
                text = await response.text()
                try:
                    raise ApiError.from_status(response.status, json.loads(text))
                except json.JSONDecodeError:
                    raise ApiError.from_status(response.status, text) from None
            try:
                async for line in response.content:
                    if line.strip():
                        event = json.loads(line)
                        if isinstance(event, dict):
                            yield event
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise ApiError(0, "WatchBroken", f"GET {path}: {exc!r}") from exc

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None,
        timeout: aiohttp.ClientTimeout,
        body: object = None,
    ) -> aiohttp.ClientResponse:
        headers = dict(_JSON)
        # Adds the bearer token, refreshing it first when the configuration knows how.
        await self.api.update_params_for_auth(headers, [], ["BearerToken"])
        try:
            return await self._session.request(
                method,
                self._host + path,
                params={key: str(value) for key, value in params.items()} if params else None,
                data=None if body is None else pydantic_core.to_json(body),
                headers=headers,
                timeout=timeout,
                server_hostname=self._server_hostname,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(0, "Unreachable", f"{method} {path}: {exc!r}") from exc
