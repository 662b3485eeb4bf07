"""Fixtures of the WebRTC gateway tests: per module, one paced in-process server, one gateway in front
of it and a spy on its prompt updates; torch on one thread and WebRTC media over 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients.webrtc.harness import GatewayHarness, PromptSpy, loopback_ice, paced_server
from tests.server.harness import ServerHarness


@pytest.fixture(scope="module", autouse=True)
def _loopback_ice(one_torch_thread: None) -> Iterator[None]:
    with loopback_ice():
        yield


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHarness]:
    harness = paced_server()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def spy(server: ServerHarness) -> PromptSpy:
    return PromptSpy(server.engine)


@pytest.fixture(scope="module")
def gateway(server: ServerHarness) -> Iterator[GatewayHarness]:
    harness = GatewayHarness(server.address)
    yield harness
    harness.close()
