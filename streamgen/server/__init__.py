"""The gRPC serving layer: a thin ``grpc.aio`` servicer over :class:`streamgen.engine.engine.AsyncEngine`.

Modules: ``app`` (assembly, ``streamgen serve``, drain), ``servicer`` (one Generate call = one
engine session), ``convert`` (protos <-> dataclasses, status codes), ``encoders`` + ``fmp4``
(H.264 fMP4 / Annex-B, JPEG, raw), ``auth`` (bearer token), ``metrics`` (Prometheus), ``logs``
(structured lines), ``health`` (probe CLI), ``config`` (ServerConfig).

All generation behaviour - validation limits, admission, batching, pacing, backpressure - lives
in the engine; nothing here may touch tensors or KV blocks. Importing this package does nothing.
"""
