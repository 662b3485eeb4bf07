"""Fixtures of the WebRTC gateway tests: per module, one paced in-process server, one gateway in front
of it and a spy on its prompt updates (and, where asked, a one-stream server); torch on one thread
and WebRTC media over 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients.webrtc.harness import FPS, GatewayHarness, PromptSpy, loopback_ice, paced_server
from tests.server.harness import ServerHarness, make_engine, with_config


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


@pytest.fixture(scope="module")
def one_session_server() -> Iterator[ServerHarness]:
    """A server with room for one stream and no queue: the second viewer is refused at once."""
    with ServerHarness(make_engine(max_lead_s=0.5, max_sessions=1, unbounded_max_frames=60 * FPS),
                       with_config(max_waiting=0)) as harness:
        yield harness
