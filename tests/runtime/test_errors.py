"""The one API error: which failures a retry may mend, and how library errors become it."""

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from gpushare.runtime.errors import ApiError, Translated


@pytest.mark.parametrize(
    ("status", "temporary"),
    [(0, True), (409, True), (410, True), (429, True), (500, True), (503, True),
     (400, False), (401, False), (403, False), (404, False), (422, False)],
)  # fmt: skip
def test_only_lost_connections_conflicts_gone_throttling_and_server_errors_are_temporary(
    status: int, temporary: bool
) -> None:
    assert ApiError(status, "r", "m").temporary is temporary


def test_a_status_body_gives_reason_and_message() -> None:
    error = ApiError.from_status(404, {"reason": "NotFound", "message": 'pods "p" not found'})
    assert (error.status, error.reason, error.message) == (404, "NotFound", 'pods "p" not found')
    assert str(error) == '404 NotFound: pods "p" not found'
    assert (
        ApiError.from_status(502, "<html>bad gateway</html>").message == "<html>bad gateway</html>"
    )


async def test_client_errors_become_api_errors_naming_the_action() -> None:
    with pytest.raises(ApiError) as caught:
        async with Translated("patch node n1"):
            raise ApiException(status=409, reason="Conflict")
    assert caught.value.status == 409
    assert "patch node n1" in str(caught.value)

    with pytest.raises(ApiError) as lost:
        async with Translated("list pods"):
            raise aiohttp.ClientConnectionError("refused")
    assert lost.value.status == 0 and lost.value.temporary
    assert "list pods" in str(lost.value)


async def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError):
        async with Translated("anything"):
            raise KeyError("x")
