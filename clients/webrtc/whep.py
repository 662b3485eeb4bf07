"""WHEP (WebRTC-HTTP Egress Protocol, RFC 9725): standard players watch without the page.

    POST   /whep?prompt=...&seed=...   body: the player's SDP offer (Content-Type: application/sdp)
           -> 201 Created, body: the SDP answer (every candidate in it: no trickle ICE),
              Location: /whep/<id>, one Link: <url>; rel="ice-server" header per --ice-server
    DELETE /whep/<id>                  ends the viewer (its Generate call is cancelled) -> 200
    PATCH  /whep/<id>                  405: the gateway does not take trickled candidates
    OPTIONS /whep                      CORS preflight (players in a browser on another origin)

A WHEP viewer is the page's viewer without the data channel: the prompt is fixed by the query
string, and the stream ends with DELETE, the peer connection closing, or the player going silent
(no RTCP for the gateway's peer timeout). Errors are plain text with the HTTP status: 400 bad
offer or query, 415 not SDP, 502 server unreachable, 503 the gateway full or the server busy.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from clients.webrtc.live_ts import QueryError, parse_query
from clients.webrtc.protocol import MAX_OFFER_BYTES, OfferError, Refused, check_sdp
from streamgen.server.logs import event

if TYPE_CHECKING:
    from clients.webrtc.gateway import Gateway

log = logging.getLogger("clients.webrtc")

SDP_TYPE = "application/sdp"
QUERY_KEYS = ("prompt", "seed")
_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Location, Link"}


def add_routes(app: web.Application, gateway: Gateway) -> None:
    async def post(request: web.Request) -> web.Response:
        return await offer(gateway, request)

    async def delete(request: web.Request) -> web.Response:
        viewer = gateway.viewers.get(request.match_info["viewer_id"])
        if viewer is None or viewer.kind != "whep":
            return _text(404, "no such WHEP session (it ended, or was never created)")
        await viewer.close("WHEP DELETE")
        return _text(200, "stopped")

    async def patch(request: web.Request) -> web.Response:
        return _text(405, "trickle ICE is not supported: every gateway candidate is in the answer; "
                          "send every candidate of yours in the offer", Allow="DELETE")

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**_CORS, "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
                                                 "Access-Control-Allow-Headers": "Content-Type, Authorization",
                                                 "Accept-Post": SDP_TYPE})

    app.router.add_post("/whep", post)
    app.router.add_route("OPTIONS", "/whep", preflight)
    app.router.add_delete("/whep/{viewer_id}", delete)
    app.router.add_patch("/whep/{viewer_id}", patch)
    app.router.add_route("OPTIONS", "/whep/{viewer_id}", preflight)


async def offer(gateway: Gateway, request: web.Request) -> web.Response:
    viewer_id = uuid.uuid4().hex[:8]
    if request.content_type != SDP_TYPE:
        return _reject(415, viewer_id, f"the body must be an SDP offer with Content-Type: {SDP_TYPE}, "
                                       f"got {request.content_type or 'none'}")
    try:
        query = parse_query(request.query, keys=QUERY_KEYS)
        body = await request.content.read(MAX_OFFER_BYTES + 1)
        if len(body) > MAX_OFFER_BYTES:
            raise OfferError(f"the offer is over {MAX_OFFER_BYTES} bytes")
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise OfferError("the offer is not UTF-8 text") from None
        check_sdp(sdp)
        viewer = await gateway.negotiate(viewer_id, sdp, query.prompt, query.seed, kind="whep")
    except (QueryError, OfferError) as exc:
        return _reject(400, viewer_id, str(exc))
    except Refused as exc:
        return _reject(exc.status, viewer_id, str(exc), **exc.fields)
    links = [server.link_header() for server in gateway.config.ice_servers]
    headers: Any = {**_CORS, "Location": f"/whep/{viewer_id}", "Content-Type": SDP_TYPE}
    response = web.Response(status=201, body=viewer.pc.localDescription.sdp.encode(), headers=headers)
    for link in links:
        response.headers.add("Link", link)
    return response


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain", headers={**_CORS, **headers})


def _reject(status: int, viewer_id: str, message: str, **fields: Any) -> web.Response:
    event(log, "whep_rejected", logging.WARNING, viewer=viewer_id, status=status, error=message, **fields)
    return _text(status, message + "".join(f"\n{k}: {v}" for k, v in fields.items()))
