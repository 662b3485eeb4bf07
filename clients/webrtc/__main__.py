"""``python -m clients.webrtc``: serve the WebRTC preview page for a streamgen server.

    python -m clients.webrtc --grpc 127.0.0.1:50051 [--port 8080] [--ice-server stun:HOST:PORT ...]

then open http://127.0.0.1:8080 (or ``/?obs=1&prompt=...`` as an OBS Browser Source, or
``/live.ts?prompt=...`` as an OBS Media Source, in ffplay or VLC; WHEP players use ``/whep``).
Ctrl-C / SIGTERM closes every viewer (their server streams are cancelled) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from clients.stream import ENCODINGS
from clients.webrtc.gateway import CODECS, DEFAULT_PROMPT, Gateway, GatewayConfig
from clients.webrtc.ice import CREDENTIAL_ENV, USERNAME_ENV, ice_servers_from
from clients.webrtc.track import DEFAULT_MAX_LAG_S
from streamgen.server import logs

EXIT_OK, EXIT_LISTEN, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.webrtc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a web page that plays a streamgen server's video live over WebRTC "
                    "(one gRPC Generate stream per viewer; prompt changes and stop over a data channel).",
        epilog="pages:\n"
               "  /                       prompt box, start/stop, live stats (fps, latency) and the video\n"
               "  /?obs=1&prompt=TEXT     clean view for an OBS Browser Source: starts by itself, no controls,\n"
               "                          the video fills the frame; reconnects after errors (seed=N optional)\n"
               "  POST /offer             JSON {sdp, type: \"offer\", prompt?, seed?} -> the answer; errors are\n"
               "                          JSON {error} with 400 (bad offer), 502 (server down), 503 (full)\n"
               "  POST /whep              WHEP (RFC 9725): SDP offer (application/sdp) -> 201 + SDP answer,\n"
               "                          Location: /whep/<id>; DELETE it to stop (?prompt=TEXT&seed=N)\n"
               "  /live.ts?prompt=TEXT    the stream as H.264 in MPEG-TS over HTTP (seed=N, fps=N optional):\n"
               "                          OBS Media Source, ffplay, VLC; closing the connection ends the stream\n"
               "  /config                 JSON: the ICE servers the page uses\n"
               "  /status                 JSON: the server address and the viewers\n\n"
               "OBS (Windows/macOS): Sources -> + -> Browser; URL http://127.0.0.1:8080/?obs=1&prompt=a%20red%20mug;\n"
               "width/height = the model's video size or a multiple; tick 'Shutdown source when not visible'\n"
               "so hiding the source ends its stream.\n"
               "OBS (Linux builds without Browser Source): Sources -> + -> Media Source; untick 'Local File';\n"
               "Input http://127.0.0.1:8080/live.ts?prompt=a%20red%20mug; Input Format mpegts.\n\n"
               f"TURN credentials come from env {USERNAME_ENV} and {CREDENTIAL_ENV}.\n\n"
               "exit codes: 0 stopped by SIGINT/SIGTERM, 1 cannot listen on --host/--port, 2 bad arguments")
    p.add_argument("--grpc", required=True, metavar="HOST:PORT", help="address of `streamgen serve`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve the page on (default: %(default)s; 0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s; 0 = any free port)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt when the page names none (default: %(default)r)")
    p.add_argument("--codec", choices=list(CODECS), default="vp8",
                   help="WebRTC video codec (default: %(default)s; VP8 plays in every browser and OBS)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default="h264",
                   help="encoding asked of the gRPC server, decoded by the gateway (default: %(default)s)")
    p.add_argument("--max-viewers", type=int, default=8,
                   help="concurrent viewers, page, WHEP and /live.ts together (default: %(default)s)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for both peers (repeatable): stun:HOST[:PORT] or turn:HOST[:PORT]"
                        f"[?transport=udp|tcp]; TURN credentials from env {USERNAME_ENV} / {CREDENTIAL_ENV} "
                        "(default: none, host candidates only: one machine or a LAN)")
    p.add_argument("--max-lag-ms", type=float, default=1000 * DEFAULT_MAX_LAG_S,
                   help="live edge: skip a frame that would reach the viewer this much later than it could "
                        "(default: %(default)g)")
    p.add_argument("--peer-timeout-s", type=float, default=3.0,
                   help="a viewer that sends no RTCP for this long is gone: its stream is cancelled "
                        "(default: %(default)g)")
    p.add_argument("--token", help="bearer token for the server (default: env STREAMGEN_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect to the server with TLS")
    p.add_argument("--ca-cert", type=Path, help="CA certificate (PEM) for --tls (default: system roots)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines on stderr")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def config_from(args: argparse.Namespace, env: Mapping[str, str]) -> GatewayConfig:
    """The parsed command line (and the environment's token and TURN credentials) as a config.
    Raises ValueError."""
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise ValueError(f"--ca-cert {args.ca_cert} is not a file")
    return GatewayConfig(
        grpc_target=args.grpc, host=args.host, port=args.port, codec=args.codec, encoding=args.encoding,
        prompt=args.prompt, max_viewers=args.max_viewers,
        ice_servers=ice_servers_from(args.ice_server, env), max_lag_ms=args.max_lag_ms,
        peer_timeout_s=args.peer_timeout_s,
        token=args.token or env.get("STREAMGEN_TOKEN") or None, tls=args.tls,
        ca_cert=args.ca_cert.read_bytes() if args.ca_cert else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args, os.environ)
    except ValueError as exc:
        print(f"python -m clients.webrtc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_format, args.log_level)
    for name in ("aiortc", "aioice"):  # their INFO lines are per-packet-state chatter
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(f"python -m clients.webrtc: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_LISTEN
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
