"""ICE servers (STUN / TURN) for both peers: the gateway's aiortc connections and the viewers'.

Without any, WebRTC works only where the two peers reach each other's host addresses (one machine,
a flat LAN, a published UDP range). ``--ice-server URL`` (repeatable) adds a server; TURN servers
take their credentials from the environment, never from the command line (which ``ps`` shows)::

    STREAMGEN_TURN_USERNAME=user STREAMGEN_TURN_CREDENTIAL=secret \\
        python -m clients.webrtc --grpc HOST:PORT --ice-server stun:stun.example.org:3478 \\
        --ice-server turn:turn.example.org:3478?transport=udp

The same list reaches the page (``GET /config``) and WHEP players (``Link: <url>; rel="ice-server"``
headers, RFC 9725 section 4.4), so a viewer behind a NAT relays through the same TURN server.

Pure: no I/O but reading the environment mapping it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCIceServer

SCHEMES = ("stun", "stuns", "turn", "turns")
USERNAME_ENV = "STREAMGEN_TURN_USERNAME"
CREDENTIAL_ENV = "STREAMGEN_TURN_CREDENTIAL"


@dataclass(frozen=True)
class IceServer:
    url: str                                           # stun:host[:port] or turn(s):host[:port][?transport=udp|tcp]
    username: str | None = None                        # TURN only
    credential: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        scheme, _, rest = self.url.partition(":")
        if scheme not in SCHEMES or not rest or rest.startswith("//"):
            raise ValueError(f"ICE server {self.url!r} must look like stun:HOST[:PORT] or turn:HOST[:PORT] "
                             f"(schemes: {', '.join(SCHEMES)})")
        if self.is_turn and not (self.username and self.credential):
            raise ValueError(f"TURN server {self.url!r} needs a username and a credential: set "
                             f"{USERNAME_ENV} and {CREDENTIAL_ENV}")

    @property
    def is_turn(self) -> bool:
        return self.url.startswith("turn")

    def to_aiortc(self) -> RTCIceServer:
        return RTCIceServer(urls=self.url, username=self.username, credential=self.credential)

    def to_page(self) -> dict[str, Any]:
        """The browser's RTCIceServer dictionary."""
        entry: dict[str, Any] = {"urls": self.url}
        if self.is_turn:
            entry.update(username=self.username, credential=self.credential)
        return entry

    def link_header(self) -> str:
        """A WHEP ``Link`` header value (RFC 9725 section 4.4)."""
        value = f'<{self.url}>; rel="ice-server"'
        if self.is_turn:
            value += f'; username="{self.username}"; credential="{self.credential}"; credential-type="password"'
        return value


def ice_servers_from(urls: list[str] | tuple[str, ...], env: Mapping[str, str]) -> tuple[IceServer, ...]:
    """``--ice-server`` values -> servers; TURN ones get the credentials in ``env``. Raises ValueError."""
    username, credential = env.get(USERNAME_ENV) or None, env.get(CREDENTIAL_ENV) or None
    return tuple(IceServer(url, username, credential) if url.startswith("turn") else IceServer(url) for url in urls)
