"""streamgen.model.prepack: prepacked oneDNN linears give F.linear's outputs (float32 to summation order, bf16
to bf16 rounding), the whole transformer and a stream through the engine match the unpacked ones, and every
combination that cannot run is refused with what to use instead."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamgen.config import Preset
from streamgen.model.compile import prepare_for_inference
from streamgen.model.prepack import (
    PrepackedLinear,
    onednn_unavailable,
    prepack_linears,
    resolve_linear,
)
from streamgen.model.transformer import CausalWanTransformer

MakeModel = Callable[..., CausalWanTransformer]  # the tiny_model fixture (tests/conftest.py)

pytestmark = pytest.mark.skipif(onednn_unavailable() is not None,
                                reason=f"prepacked linears need oneDNN: {onednn_unavailable()}")

# float32: the same products summed in another order (~1e-6 relative at these widths); bf16: outputs rounded
# to bf16 (8 bits of mantissa), so one rounding step apart at most.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}
# oneDNN packs bf16 weights only with AVX512-BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU refuses (checked below).
PACKABLE = [pytest.param(dtype, marks=pytest.mark.skipif(
    onednn_unavailable(dtype) is not None, reason=f"this CPU cannot pack it: {onednn_unavailable(dtype)}"))
    for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype", PACKABLE)
@pytest.mark.parametrize("shape", [(192, 64), (2, 96, 64), (1, 1, 64), (3, 2, 5, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_f_linear(dtype: torch.dtype, shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(64, 48, bias=bias).to(dtype).requires_grad_(False)
    packed = PrepackedLinear(ref, rows_hint=192)  # other row counts than the hint run too
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        out = packed(x)
        expected = F.linear(x, ref.weight, ref.bias)
    assert out.shape == (*shape[:-1], 48) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", PACKABLE)
def test_prepacked_transformer_matches_the_unpacked_one(dtype: torch.dtype, test_preset: Preset,
                                                        tiny_model: MakeModel) -> None:
    model = tiny_model(test_preset.model, seed=None, scale=0.05).to(dtype).eval()
    packed = copy.deepcopy(model)
    rows = test_preset.chunk_tokens
    n_linear = sum(1 for m in model.modules() if type(m) is nn.Linear)
    assert prepack_linears(packed, rows) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.state_dict().keys() == model.state_dict().keys()  # checkpoints and model ids see the same weights
    m = test_preset.model
    emb = torch.randn(1, m.text_max_tokens, m.text_dim).to(dtype)
    x = torch.randn(1, m.latent_channels, 3, test_preset.latent_height, test_preset.latent_width).to(dtype)
    t = torch.tensor([[900.0, 700.0, 500.0]])
    with torch.no_grad():
        ref = model(x, t, model.encode_text(emb)).float()
        out = packed(x, t, packed.encode_text(emb)).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    # float32: summation order only; bf16: bf16 roundings of a few GEMM outputs propagating through the blocks.
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def test_a_stream_through_the_engine_matches(test_preset: Preset) -> None:
    """What `streamgen serve --linear onednn|aten` builds (the factory), one stream each: 4 denoising steps per
    chunk through the KV cache and the VAE decode. float32: the decoded frames agree to summation noise."""
    from streamgen.engine.engine import EngineConfig
    from streamgen.engine.factory import ModelSource, build_engine
    from streamgen.engine.request import GenerationRequest

    frames, reports = {}, {}
    for linear in ("aten", "onednn"):
        seen: list[tuple[str, dict[str, object]]] = []
        source = ModelSource(preset="test", random_init=True, text_encoder="hash", dtype="float32", linear=linear)
        engine, _ = build_engine(source, EngineConfig(kv_memory_bytes=2**22, max_frames=64),
                                 report=lambda name, _seen=seen, **fields: _seen.append((name, fields)))
        reports[linear] = dict(seen)["linear"]["kernel"]
        per_chunk = test_preset.pixel_frames(test_preset.sampler.chunk_frames)
        sid = engine.add_request(GenerationRequest("a red can", seed=3, num_frames=3 * per_chunk))
        out = []
        while engine.has_unfinished():
            out += [torch.as_tensor(o.frames) for o in engine.step() if o.session_id == sid and len(o.frames)]
        frames[linear] = torch.cat(out).float()
    assert reports == {"aten": "aten", "onednn": "onednn"}
    assert frames["aten"].shape == frames["onednn"].shape and frames["aten"].numel() > 0
    assert frames["aten"].std() > 1  # real pictures, not a constant that would match trivially
    assert (frames["aten"] - frames["onednn"]).abs().max().item() <= 1.0  # uint8: at most one level apart


def test_a_dtype_onednn_cannot_pack_is_refused_naming_what_to_use() -> None:
    with pytest.raises(ValueError, match="run float32 or bfloat16, not float16; use --linear aten"):
        PrepackedLinear(nn.Linear(8, 4).half(), rows_hint=4)
    why = onednn_unavailable(torch.bfloat16)  # an AVX2-only CPU: refused in words, not a oneDNN error
    if why is not None:
        with pytest.raises(ValueError, match="oneDNN cannot pack bfloat16 weights on this CPU"):
            PrepackedLinear(nn.Linear(8, 4).bfloat16(), rows_hint=4)


def test_grad_and_stale_weights_are_refused() -> None:
    layer = nn.Linear(8, 4)
    packed = PrepackedLinear(layer, rows_hint=4)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad  # frozen: no gradient reaches them
    x = torch.randn(2, 8)
    assert not packed(x).requires_grad  # grad mode on, nothing to differentiate: runs
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(x.requires_grad_(True))  # a gradient asked for through the packed weight
    x = x.detach()
    with torch.no_grad():
        packed(x)
        layer.weight.add_(1.0)  # written after packing
        with pytest.raises(RuntimeError, match="stale"):
            packed(x)
    packed = PrepackedLinear(nn.Linear(8, 4).requires_grad_(False), rows_hint=4)
    packed.to(torch.bfloat16)  # cast after packing
    with torch.no_grad(), pytest.raises(RuntimeError, match="stale"):
        packed(x.to(torch.bfloat16))


def test_resolution() -> None:
    assert resolve_linear("auto", "cpu").kernel == "onednn"
    assert resolve_linear("aten", "cpu").kernel == "aten"
    auto_int8 = resolve_linear("auto", "cpu", quantize="int8")
    assert auto_int8.kernel == "aten" and "int8" in auto_int8.reason
    assert resolve_linear("auto", "cpu", compile=True).kernel == "aten"
    assert resolve_linear("auto", "cuda").kernel == "aten"  # resolving never needs the device to exist


@pytest.mark.parametrize(("device", "quantize", "compile", "message"), [
    ("cuda", "none", False, "CPU path"),
    ("cpu", "int8", False, "--quantize int8"),
    ("cpu", "none", True, "--compile"),
])
def test_explicit_onednn_that_cannot_run_is_an_error(device: str, quantize: str, compile: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc:
        resolve_linear("onednn", device, quantize=quantize, compile=compile)
    assert "--linear aten" in str(exc.value)
    with pytest.raises(ValueError, match="choose one of auto, onednn, aten"):
        resolve_linear("mkl", "cpu")


def test_prepare_for_inference_checks_before_it_changes_anything(test_preset: Preset, tiny_model: MakeModel) -> None:
    model = tiny_model(test_preset.model, seed=None, scale=0.05)
    with pytest.raises(ValueError, match="--quantize int8"):
        prepare_for_inference(model, quantize="int8", linear="onednn", rows_hint=8)
    with pytest.raises(ValueError, match="rows_hint"):
        prepare_for_inference(model, linear="onednn")
    with pytest.raises(ValueError, match="resolved linear kernel"):
        prepare_for_inference(model, linear="auto")
    assert any(type(m) is nn.Linear for m in model.modules())  # untouched by the refused calls
    prepare_for_inference(model, linear="onednn", rows_hint=8)
    assert any(type(m) is PrepackedLinear for m in model.modules())


def test_bf16_on_a_cpu_whose_onednn_cannot_pack_it_falls_to_aten_or_fails_clearly() -> None:
    """oneDNN packs bf16 weights only with AVX512-BW/VL/DQ or AVX-NE-CONVERT. With its ISA capped at AVX2 (what an
    AVX2-only CPU has), auto keeps F.linear for a bf16 model and says why; an explicit onednn is an error; float32
    still packs."""
    import subprocess
    import sys

    code = """
import torch
from streamgen.model.prepack import resolve_linear
auto = resolve_linear("auto", "cpu", dtype=torch.bfloat16)
print(auto.kernel, "|", auto.reason)
print(resolve_linear("auto", "cpu", dtype=torch.float32).kernel)
try:
    resolve_linear("onednn", "cpu", dtype=torch.bfloat16)
except ValueError as err:
    print("refused |", err)
"""
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr
    auto, fp32, refused = proc.stdout.strip().splitlines()
    assert auto.startswith("aten | auto: oneDNN cannot pack bfloat16 weights on this CPU")
    assert fp32 == "onednn"
    assert refused.startswith("refused | --linear onednn cannot run here: oneDNN cannot pack bfloat16")
    assert refused.endswith("use --linear aten (or auto)")
