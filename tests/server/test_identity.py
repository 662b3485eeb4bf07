"""ModelInfo.model_id: equal for equal models whatever the serving limits, different when any weight differs."""

from __future__ import annotations

import grpc
import torch

from streamgen.api.v1 import pb, pb_grpc
from streamgen.engine.engine import Engine
from streamgen.model.quantize import quantize_transformer
from streamgen.server.identity import model_id
from tests.server.harness import PRESET, ServerHarness, make_engine


def _id(e: Engine) -> str:
    return model_id(PRESET, e.model, e.vae, type(e.runner.text.token_encoder).__name__)


def test_model_id_covers_weights_and_dtype_not_limits() -> None:
    a, b = make_engine(), make_engine(max_sessions=2, kv_memory_bytes=2**21)
    assert _id(a) == _id(b) and _id(a).startswith("sha256:") and len(_id(a)) == len("sha256:") + 16
    with torch.no_grad():
        next(b.vae.parameters()).view(-1)[0] += 1e-3  # one VAE weight
    assert _id(a) != _id(b)
    c = make_engine()
    c.model.to(torch.bfloat16)
    assert _id(a) != _id(c)
    assert model_id(PRESET, a.model, a.vae, "MiniLMTokenEncoder") != _id(a)  # another prompt encoder


def test_model_id_covers_int8_weights() -> None:
    """--quantize int8 changes the frames, so it changes the id; the same INT8 model hashes the same."""
    a, b, c = make_engine(), make_engine(), make_engine()
    quantize_transformer(b.model, "int8")
    quantize_transformer(c.model, "int8")
    assert _id(a) != _id(b) == _id(c)


def test_get_model_info_reports_the_model_id() -> None:
    engine = make_engine()
    expected = _id(engine)
    with ServerHarness(engine) as server, grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.StreamGenStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model_id == expected
