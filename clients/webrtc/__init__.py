"""WebRTC demo client: watch a streamgen stream live in a browser or in OBS (a Browser Source).

``python -m clients.webrtc --grpc HOST:PORT`` runs a gateway (aiohttp + aiortc; extra ``webrtc``)
that serves a page, answers its WebRTC offer, opens a ``Generate`` stream per viewer and sends
the frames as a paced VP8/H.264 video track; a data channel carries prompt changes and stop.

Modules: ``gateway`` (HTTP, viewers, tear-down), ``track`` (paced video track), ``upstream``
(the gRPC call), ``protocol`` (offer and data-channel message checks), ``__main__`` (command
line), ``static/`` (the page). Like every client, it speaks only the public gRPC API and never
imports the engine, the model or torch. Importing this package does nothing.
"""
