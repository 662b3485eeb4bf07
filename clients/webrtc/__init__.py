"""Live preview client: watch a streamgen stream in a browser, a WHEP player or OBS.

``python -m clients.webrtc --grpc HOST:PORT`` runs a gateway (aiohttp + aiortc; extra ``webrtc``)
that serves a page, answers its WebRTC offer (or a WHEP player's), opens a ``Generate`` stream per
viewer and sends the frames as a live-edge VP8/H.264 video track; a data channel carries prompt
changes and stop. ``/live.ts`` serves the same stream as MPEG-TS over HTTP (OBS Media Source).

Modules: ``gateway`` (HTTP routes, negotiation, limits), ``viewer`` (one WebRTC viewer and its
tear-down), ``track`` (live-edge video track), ``upstream`` (the gRPC call), ``protocol`` (offer and
data-channel message checks), ``whep`` (RFC 9725), ``live_ts`` (MPEG-TS over HTTP), ``ice``
(STUN/TURN servers), ``__main__`` (command line), ``static/`` (the page). Like every client, it
speaks only the public gRPC API and never
imports the engine, the model or torch. Importing this package does nothing.
"""
