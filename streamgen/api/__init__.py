"""Generated gRPC/protobuf stubs of the versioned API in ``protos/`` (one sub-package per version).

The ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*_pb2.pyi`` files under ``streamgen/api/v1/`` are build
output: generated from ``protos/streamgen/v1/streamgen.proto`` by :mod:`streamgen.api.build`
(``make proto``, run by ``make venv``/``make test``/``make demo``), git-ignored, never edited by
hand. Importing :mod:`streamgen.api.v1` regenerates them if they are missing or older than the
proto (a fresh clone used without ``make``); that is the only import-time side effect in
streamgen. This package must never hold hand-written API logic: conversions live in
``streamgen.server``.
"""
