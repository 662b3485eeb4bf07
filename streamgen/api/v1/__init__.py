"""streamgen.v1 API stubs: ``pb`` (messages) and ``pb_grpc`` (service stubs and servicer base).

Importing this module (re)generates the stubs when they are missing or stale, so a fresh clone
works with plain ``pytest`` too (see :mod:`streamgen.api`). Nothing else happens at import.
"""

from __future__ import annotations

from streamgen.api import build as _build

_build.ensure()

from streamgen.api.v1 import streamgen_pb2 as pb  # noqa: E402
from streamgen.api.v1 import streamgen_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["StreamGen"].full_name  # "streamgen.v1.StreamGen"

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
