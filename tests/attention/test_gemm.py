"""The GEMM - softmax - GEMM attention path (``--attention gemm``, the ``auto`` of a CPU with native bf16) against
references."""

from __future__ import annotations

import pytest
import torch

from streamgen import precision
from streamgen.attention import AttentionBackendName, get_backend, resolve_attention
from streamgen.attention.gemm import MIN_KEYS, attention_gemm, prefers_gemm
from streamgen.config import ATTENTION_CHOICES, ATTENTION_NAMES


def qkv(lq: int, lk: int, dtype: torch.dtype, b: int = 2, h: int = 4, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Scores of a few units, as a QK-normalised model has them (logits up to ~6).
    return [torch.randn(b, n, h, d, generator=g).mul(1.6).to(dtype) for n in (lq, lk, lk)]


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as on a CPU with AVX512-BF16 / AMX, whatever this machine has."""
    monkeypatch.setattr(precision, "bf16_gemms_native", lambda: True)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return get_backend("sdpa").attention(q.double(), k.double(), v.double(), mask)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("budget", [None, 2 * 4 * 5 * 40], ids=["one_block", "blocks_of_5_queries"])
def test_float32_equals_sdpa(masked: bool, budget: int | None) -> None:
    q, k, v = qkv(24, 40, torch.float32)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True
    kw = {} if budget is None else {"score_budget": budget}
    out = attention_gemm(q, k, v, mask, **kw)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, get_backend("sdpa").attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_a_2d_mask_broadcasts_as_for_sdpa() -> None:
    q, k, v = qkv(12, 20, torch.float32)
    mask = torch.tril(torch.ones(12, 20, dtype=torch.bool), diagonal=8)
    torch.testing.assert_close(attention_gemm(q, k, v, mask), get_backend("sdpa").attention(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lk", [192, 768])
def test_bfloat16_error_is_bounded_against_float64(lk: int) -> None:
    """bf16 rounds the scores as well as the probabilities: on logits up to ~10 its relative L2 error against
    float64 is ~1 % (measured 0.7-1.1 %), 4-6x SDPA's own bf16 error (~0.2 %); bounded at 1.5 % and 8x."""
    q, k, v = qkv(192, lk, torch.bfloat16, b=1)
    ref = reference(q, k, v)

    def rel(out: torch.Tensor) -> float:
        return ((out.double() - ref).norm() / ref.norm()).item()

    err_gemm, err_sdpa = rel(attention_gemm(q, k, v)), rel(get_backend("sdpa").attention(q, k, v))
    assert err_gemm < 0.015 and err_gemm <= 8 * err_sdpa, (err_gemm, err_sdpa)
    assert err_gemm > 1e-4  # the comparison ran in bf16, not silently in a wider type


def test_default_model_frames_are_as_close_to_float32_as_with_sdpa(native_bf16: None) -> None:
    """Where the error matters: the committed default model's decoded frames in bf16 through each backend,
    against float32 (measured on 4 captions x 48 frames: PSNR 51-57 dB for both backends). The GEMM path is
    forced on (it is only taken with native bf16), so the comparison holds on every CPU."""
    from streamgen.pipeline import Pipeline

    def frames(dtype: str, attention: str) -> torch.Tensor:
        pipe = Pipeline.from_pretrained("checkpoints/default", dtype=dtype, attention=attention)
        return torch.from_numpy(pipe("a glossy red bottle turning slowly on a white table", num_frames=24,
                                     seed=0)).double()

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return (10 * torch.log10(255.0 ** 2 / ((a - b) ** 2).mean())).item()

    ref = frames("float32", "sdpa")
    p_gemm, p_sdpa = psnr(frames("bfloat16", "gemm"), ref), psnr(frames("bfloat16", "sdpa"), ref)
    assert p_gemm >= 40 and p_gemm >= p_sdpa - 3, (p_gemm, p_sdpa)


def test_query_blocks_give_the_one_block_result_exactly() -> None:
    q, k, v = qkv(30, 50, torch.bfloat16)
    whole = attention_gemm(q, k, v)
    for budget in (2 * 4 * 50, 2 * 4 * 50 * 7, 1):  # 1 query per block, 7, and the floor of 1 query
        torch.testing.assert_close(attention_gemm(q, k, v, score_budget=budget), whole, atol=0, rtol=0)
    with pytest.raises(ValueError, match="score_budget"):
        attention_gemm(q, k, v, score_budget=0)


def test_dispatch_takes_the_gemm_path_only_for_long_bf16_cpu_calls(native_bf16: None) -> None:
    gemm = get_backend("gemm")
    sdpa = get_backend("sdpa")
    q, k, v = qkv(16, MIN_KEYS, torch.bfloat16)
    assert prefers_gemm(q, k)
    torch.testing.assert_close(gemm.attention(q, k, v), attention_gemm(q, k, v), atol=0, rtol=0)
    assert not torch.equal(gemm.attention(q, k, v), sdpa.attention(q, k, v))  # another kernel, not SDPA
    # Few keys (cross-attention's text tokens) and float32: SDPA's kernel, bit for bit.
    q, k, v = qkv(16, MIN_KEYS - 1, torch.bfloat16)
    assert not prefers_gemm(q, k)
    torch.testing.assert_close(gemm.attention(q, k, v), sdpa.attention(q, k, v), atol=0, rtol=0)
    q, k, v = qkv(16, 2 * MIN_KEYS, torch.float32)
    assert not prefers_gemm(q, k)
    torch.testing.assert_close(gemm.attention(q, k, v), sdpa.attention(q, k, v), atol=0, rtol=0)


def test_without_native_bf16_every_call_goes_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AVX2-only CPU a bf16 GEMM is emulated (~1 % of the float32 rate) while SDPA widens to float32
    inside: the GEMM path would be ~50x slower there, so it is never taken and ``auto`` builds SDPA."""
    monkeypatch.setattr(precision, "bf16_gemms_native", lambda: False)
    q, k, v = qkv(16, 2 * MIN_KEYS, torch.bfloat16)
    assert not prefers_gemm(q, k)
    torch.testing.assert_close(get_backend("gemm").attention(q, k, v), get_backend("sdpa").attention(q, k, v),
                               atol=0, rtol=0)
    backend, why = resolve_attention("auto", "cpu")
    assert backend == "sdpa" and "without native bf16" in why
    assert resolve_attention("gemm", "cpu") == ("gemm", "asked for")


@pytest.mark.parametrize(("flags", "native"), [((), False), (("avx512_bf16",), True), (("amx_bf16",), True)])
def test_the_native_check_follows_the_cpu_flags(flags: tuple[str, ...], native: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    precision.bf16_gemms_native.cache_clear()
    try:
        assert precision.bf16_gemms_native() is native
        q, k, _ = qkv(16, 2 * MIN_KEYS, torch.bfloat16)
        assert prefers_gemm(q, k) is native
        assert resolve_attention("auto", "cpu")[0] == ("gemm" if native else "sdpa")
    finally:
        precision.bf16_gemms_native.cache_clear()  # the next caller reads this machine's flags again


def test_auto_resolves_per_device_and_names_match_the_enum(native_bf16: None) -> None:
    assert tuple(b.value for b in AttentionBackendName) == ATTENTION_NAMES
    assert ATTENTION_CHOICES[0] == "auto"
    assert resolve_attention("auto", "cpu")[0] == "gemm"
    assert resolve_attention("auto", "cuda")[0] == "sdpa"  # resolving needs no CUDA: only the device type
    assert resolve_attention("flex", "cpu") == ("flex", "asked for")
    with pytest.raises(ValueError, match="valid: auto, sdpa, gemm"):
        resolve_attention("fast", "cpu")
