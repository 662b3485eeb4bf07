"""What the page may send the gateway, checked: the HTTP offer and the data-channel messages.

``POST /offer`` takes JSON ``{"sdp": "...", "type": "offer"}`` plus optional ``"prompt"`` and
``"seed"``; anything else is a :class:`OfferError` (HTTP 400 with a JSON message). Data-channel
messages from the page are JSON objects::

    {"type": "prompt", "prompt": "a matte blue mug"}   change the prompt (next chunk boundary)
    {"type": "stop"}                                   end the stream (REASON_STOPPED)

and anything else is a :class:`MessageError`, answered on the channel with
``{"type": "error", "message": ..., "fatal": false}`` while the stream goes on. The gateway's
messages to the page are built by :func:`to_page`.

Pure functions: no I/O, no WebRTC objects, no gRPC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_OFFER_BYTES = 64 * 1024       # a browser's offer is 3-8 KB; the cap only stops abuse
MAX_MESSAGE_CHARS = 16 * 1024     # data-channel messages from the page
MAX_SEED = 2**64 - 1              # StartRequest.seed is uint64
MESSAGE_TYPES = ("prompt", "stop")
_OFFER_KEYS = ("sdp", "type", "prompt", "seed")
_RECEIVING_DIRECTIONS = ("recvonly", "sendrecv")


class OfferError(ValueError):
    """A malformed ``POST /offer`` body; the message tells the page what to fix."""


class Refused(Exception):
    """An offer the gateway cannot take now: HTTP ``status`` 502 (server) or 503 (full), a message for
    the viewer, and extra ``fields`` for the JSON error (e.g. the gRPC code)."""

    def __init__(self, status: int, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.fields = fields


class MessageError(ValueError):
    """A data-channel message the gateway does not understand."""


@dataclass(frozen=True)
class Offer:
    sdp: str
    prompt: str | None   # None: the gateway's default prompt
    seed: int


@dataclass(frozen=True)
class Message:
    type: str            # one of MESSAGE_TYPES
    prompt: str = ""     # for "prompt"


def parse_offer(body: bytes, max_prompt_chars: int | None = None) -> Offer:
    """Check an offer body. Raises :class:`OfferError` with a message meant for the page."""
    if len(body) > MAX_OFFER_BYTES:
        raise OfferError(f"the offer is {len(body)} bytes; the limit is {MAX_OFFER_BYTES}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OfferError(f"the body is not JSON ({exc}); send {{\"sdp\": ..., \"type\": \"offer\"}}") from None
    if not isinstance(data, dict):
        raise OfferError(f"the body must be a JSON object {{\"sdp\": ..., \"type\": \"offer\"}}, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(_OFFER_KEYS))
    if unknown:
        raise OfferError(f"unknown field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(_OFFER_KEYS)}")
    if data.get("type") != "offer":
        raise OfferError(f"\"type\" must be \"offer\", got {data.get('type')!r}")
    sdp = data.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferError("\"sdp\" must be a non-empty string (RTCPeerConnection.localDescription.sdp)")
    check_sdp(sdp)
    prompt = data.get("prompt")
    if prompt is not None:
        prompt = check_prompt(prompt, max_prompt_chars, OfferError)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise OfferError(f"\"seed\" must be an integer in [0, 2**64), got {seed!r}")
    return Offer(sdp=sdp, prompt=prompt, seed=seed)


def check_sdp(sdp: str) -> None:
    lines = [line.strip() for line in sdp.splitlines() if line.strip()]
    if not lines or lines[0] != "v=0":
        raise OfferError("\"sdp\" is not a session description (it must start with \"v=0\")")
    # Media sections: each starts with an m= line; the direction attribute defaults to sendrecv.
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    videos = [s for s in sections if s[0].startswith("m=video ")]
    if not videos:
        raise OfferError("the offer has no video section: add a transceiver with "
                         "pc.addTransceiver(\"video\", {direction: \"recvonly\"}) before createOffer()")
    for section in videos:
        directions = [line[2:] for line in section if line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive")]
        if (directions[-1] if directions else "sendrecv") in _RECEIVING_DIRECTIONS:
            return
    raise OfferError("the offer's video section does not receive: its direction must be recvonly or sendrecv")


def check_prompt(prompt: Any, max_chars: int | None, error: type[ValueError]) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise error(f"\"prompt\" must be a non-empty string, got {_short(prompt)}")
    if max_chars is not None and len(prompt) > max_chars:
        raise error(f"\"prompt\" has {len(prompt)} characters; the server's limit is {max_chars}")
    return prompt


def parse_message(data: str | bytes, max_prompt_chars: int | None = None) -> Message:
    """Check one data-channel message from the page. Raises :class:`MessageError`."""
    if isinstance(data, bytes):
        raise MessageError("binary messages are not understood; send JSON text such as {\"type\": \"stop\"}")
    if len(data) > MAX_MESSAGE_CHARS:
        raise MessageError(f"message of {len(data)} characters; the limit is {MAX_MESSAGE_CHARS}")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MessageError(f"not JSON ({exc}): {_short(data)}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"expected a JSON object such as {{\"type\": \"stop\"}}, got {_short(obj)}")
    kind = obj.get("type")
    if kind == "prompt":
        return Message("prompt", check_prompt(obj.get("prompt"), max_prompt_chars, MessageError))
    if kind == "stop":
        return Message("stop")
    raise MessageError(f"unknown message type {_short(kind)}; valid: {', '.join(MESSAGE_TYPES)}")


def to_page(kind: str, **fields: Any) -> str:
    """A gateway -> page message: ``{"type": kind, **fields}`` as JSON text (NaN/inf become null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
    return json.dumps({"type": kind, **clean})


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
