"""The transformer's GELU: its fast CPU form is Wan's tanh GELU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from streamgen.model.transformer import gelu_tanh


def _inputs() -> torch.Tensor:
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38, float("inf"), float("-inf")])
    spread = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 3
    return torch.cat([torch.linspace(-12, 12, 100_001), spread, special])


def test_fast_cpu_form_equals_tanh_gelu() -> None:
    x = _inputs()
    before = x.clone()
    with torch.no_grad():
        fast = gelu_tanh(x)
    ref = F.gelu(x.double(), approximate="tanh").float()  # float64 reference: judge both float32 forms
    torch.testing.assert_close(fast, ref, atol=2e-7, rtol=2e-6, equal_nan=True)  # gelu(-inf) is nan in both
    # as close to the float64 value as PyTorch's own float32 kernel (no worse than 2x its error)
    finite = ref.isfinite()
    torch_err = (F.gelu(x, approximate="tanh") - ref)[finite].abs().max()
    assert (fast - ref)[finite].abs().max() <= 2 * torch_err + 1e-7
    assert torch.isnan(gelu_tanh(torch.tensor([float("nan")]))).all()
    assert x.equal(before)  # the input is not modified in place


def test_training_and_other_dtypes_use_torch_gelu() -> None:
    x = torch.randn(1000, requires_grad=True)
    y = gelu_tanh(x)
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    F.gelu(ref_x, approximate="tanh").sum().backward()
    assert torch.equal(y, F.gelu(ref_x, approximate="tanh"))
    assert torch.equal(x.grad, ref_x.grad)
    xh = torch.randn(1000).half()
    with torch.no_grad():
        assert torch.equal(gelu_tanh(xh), F.gelu(xh, approximate="tanh"))
    xb = torch.randn(1000).bfloat16().requires_grad_(True)
    assert torch.equal(gelu_tanh(xb), F.gelu(xb, approximate="tanh"))  # autograd (training): torch's kernel


def test_bf16_fast_form_rounds_like_torch_bf16_gelu() -> None:
    """bf16 on a CPU: widened, the float32 fast form, rounded back. torch's bf16 kernel also computes in float32
    and rounds once, so the two differ where the float32 values straddle a rounding boundary (by one bf16 step) and
    far left, where torch's tanh form rounds to -0 and the sigmoid form keeps the true tiny value: never further
    from the true value than torch's result plus one step."""
    x = _inputs().bfloat16()
    before = x.clone()
    with torch.no_grad():
        fast = gelu_tanh(x)
    assert fast.dtype == torch.bfloat16 and x.equal(before)
    ref = F.gelu(x, approximate="tanh")
    finite = ref.isfinite()
    assert torch.equal(finite, fast.isfinite())  # no new inf/nan
    f, r = fast[finite].double(), ref[finite].double()
    # float64 in the sigmoid form: the same function without the tanh form's cancellation in 1 + tanh(u), which
    # reads exactly 0 for x < ~-5.5 even in float64 where the true value is tiny but not 0
    xd = x.double()[finite]
    exact = xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))
    # per value: never further from the true value than torch's bf16 result plus one bf16 step
    ulp = exact.abs() * 2.0**-7
    assert ((f - exact).abs() <= (r - exact).abs() + ulp * 1.01).all()
    assert (f - exact).abs().max() <= (r - exact).abs().max() * 1.01
    # where torch's form does not saturate (|x| < 4), the two differ on ~0.2 % of values (by one step, above)
    spread = torch.randn(200_000, generator=torch.Generator().manual_seed(1)).mul(3).bfloat16()
    spread = spread[spread.float().abs() < 4]
    with torch.no_grad():
        share = (gelu_tanh(spread) != F.gelu(spread, approximate="tanh")).float().mean()
    assert share < 5e-3
