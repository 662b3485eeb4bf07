"""The transformer's GELU: its fast CPU form is Wan's tanh GELU."""

from __future__ import annotations

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
    xb = torch.randn(1000).bfloat16()
    with torch.no_grad():
        assert torch.equal(gelu_tanh(xb), F.gelu(xb, approximate="tanh"))
