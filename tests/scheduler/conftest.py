"""Fixtures of the scheduler's tests: extenders served on loopback, API clients for them."""

from collections.abc import AsyncIterator

import aiohttp
import pytest
from kubernetes_asyncio import client

from gpushare.scheduler.kube import Kube
from gpushare.scheduler.service import Extender
from tests.scheduler.objects import SETTINGS

UNREACHABLE = "http://127.0.0.1:9"
"""An API server address where nothing listens (the discard port)."""


def kube_at(url: str) -> Kube:
    """A Kube for a plain-HTTP API server (kmock) at ``url``."""
    return Kube(client.ApiClient(client.Configuration(host=url.rstrip("/"))))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def extender() -> AsyncIterator[Extender]:
    """An extender on a free loopback port whose ledger the test fills (no API server)."""
    kube = kube_at(UNREACHABLE)
    ext = Extender(SETTINGS, kube, watch=False)
    await ext.start()
    yield ext
    await ext.stop()
    await kube.close()
