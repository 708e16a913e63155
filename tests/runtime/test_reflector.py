"""The one list-and-watch loop: resume from the last version, list again on 410, back off (with
jitter) on other failures."""

import asyncio
import contextlib

import pytest

from gpushare.runtime import reflector
from gpushare.runtime.errors import ApiError


class Script:
    """A resource whose lists and watches follow a script; records the calls."""

    def __init__(self, watches: list[str | BaseException]) -> None:
        self.watches = list(watches)
        self.calls: list[str] = []
        self.lists = 0
        self.done = asyncio.Event()

    async def list_(self) -> str:
        self.lists += 1
        self.calls.append(f"list->{10 * self.lists}")
        return str(10 * self.lists)

    async def watch(self, version: str, seconds: int) -> str:
        self.calls.append(f"watch@{version}")
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()
        outcome = self.watches.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def run(script: Script, **options: object) -> list[str]:
    loop = reflector.Reflector("things", script.list_, script.watch, **options)  # type: ignore[arg-type]
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(script.done.wait(), 5)
        assert loop.synced.is_set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return script.calls


async def test_a_watch_that_ends_resumes_from_the_last_version_seen() -> None:
    reasons: list[str] = []
    calls = await run(Script(["12", "15"]), restarted=reasons.append)
    assert calls == ["list->10", "watch@10", "watch@12", "watch@15"]
    assert reasons == ["end", "end"]


@pytest.mark.parametrize("gone", [reflector.Expired(), ApiError(410, "Expired", "too old")])
async def test_a_gone_version_lists_again_at_once(gone: BaseException) -> None:
    reasons: list[str] = []
    calls = await run(Script(["12", gone]), restarted=reasons.append, backoff=(60.0, 60.0))
    assert calls == ["list->10", "watch@10", "watch@12", "list->20", "watch@20"]
    assert reasons == ["end", "expired"]


async def test_other_failures_back_off_and_resume_where_they_were() -> None:
    reasons: list[str] = []
    failures = [ApiError(0, "Unreachable", "x"), ApiError(503, "Unavailable", "y")]
    calls = await run(Script(["12", *failures]), restarted=reasons.append, backoff=(0.01, 0.02))
    assert calls == ["list->10", "watch@10", "watch@12", "watch@12", "watch@12"]
    assert reasons == ["end", "error", "error"]


def test_the_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for failures, full in [(1, 0.2), (2, 0.4), (3, 0.8), (10, 30.0), (1000, 30.0)]:
        waits = [reflector.backoff_seconds(failures) for _ in range(200)]
        assert all(full * 0.5 <= w <= full for w in waits)
        assert max(waits) - min(waits) > 0  # jittered: watchers do not retry in step


def test_watches_last_between_the_base_and_a_fifth_more() -> None:
    lengths = {reflector.watch_seconds(300) for _ in range(200)}
    assert min(lengths) >= 300 and max(lengths) <= 360 and len(lengths) > 1
