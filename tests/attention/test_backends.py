"""Attention backends: registry behaviour, and every runnable backend against the SDPA reference.

Backends that cannot run here (xformers and flash need their packages and CUDA) are skipped
with the exact reason their ``create()`` gives, never silently.
"""

from __future__ import annotations

import pytest
import torch

from streamgen.attention import AttentionBackend, AttentionBackendName, BackendUnavailableError, get_backend
from streamgen.attention.flash import FlashBackend
from streamgen.attention.paged_common import check_paged_inputs
from streamgen.attention.xformers import XFormersBackend

ALL = [b.value for b in AttentionBackendName]
GPU_ONLY = {"xformers", "flash"}


def backend_or_skip(name: str) -> AttentionBackend:
    try:
        return get_backend(name)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def device_dtype(name: str) -> tuple[str, torch.dtype, float]:
    """Where and in what precision a backend is compared (GPU kernels are fp16-only)."""
    if name in GPU_ONLY:
        return "cuda", torch.float16, 2e-3
    return "cpu", torch.float32, 1e-5


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid backends: sdpa, flex, xformers, flash"):
        get_backend("cudnn")


@pytest.mark.parametrize("name", sorted(GPU_ONLY))
def test_gpu_backends_say_why_they_are_unavailable(name: str) -> None:
    try:
        get_backend(name)
    except BackendUnavailableError as exc:
        reason = str(exc)
        assert name in reason and ("cannot be imported" in reason or "CUDA" in reason), reason
    else:
        assert torch.cuda.is_available(), f"{name} created without CUDA"


def test_cpu_backends_are_available() -> None:
    assert get_backend("sdpa").name == "sdpa"
    assert get_backend("flex").name == "flex"  # runs on CPU with torch 2.13 (eagerly here)


def test_page_constraints_choose_the_layout() -> None:
    assert XFormersBackend.paged_layout(128) == "paged"
    assert XFormersBackend.paged_layout(1560).startswith("gather (page of 1560 tokens is not a multiple of 64")
    assert FlashBackend.paged_layout(512) == "paged"
    assert FlashBackend.paged_layout(64).startswith("gather (page of 64 tokens is not a multiple of 256")


def random_paged_case(batch: int, q_len: int, heads: int, head_dim: int, page: int, seq_lens: list[int],
                      device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Pool with shuffled page ownership; returns q, k_pool, v_pool, block_table, seq_lens, dense k, dense v."""
    num_blocks = 1 + sum(-(-n // page) for n in seq_lens) + 3
    k_pool = torch.randn(num_blocks, page, heads, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn(num_blocks, page, heads, head_dim, device=device, dtype=dtype)
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()  # never the null block 0
    width = max(-(-n // page) for n in seq_lens) + 1      # one extra padding column
    table = torch.zeros(batch, width, dtype=torch.int32)
    dense = []
    for b, n in enumerate(seq_lens):
        rows = [ids.pop() for _ in range(-(-n // page))]
        table[b, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        dense.append((k_pool[rows].flatten(0, 1)[:n], v_pool[rows].flatten(0, 1)[:n]))
    q = torch.randn(batch, q_len, heads, head_dim, device=device, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k_pool, v_pool, table.to(device), lens.to(device), dense


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seq_lens", [[12, 12], [5, 12, 9]], ids=["equal", "ragged"])
def test_paged_attention_matches_dense_sdpa(name: str, seq_lens: list[int]) -> None:
    backend = backend_or_skip(name)
    device, dtype, tol = device_dtype(name)
    ref = get_backend("sdpa")
    q, k_pool, v_pool, table, lens, dense = random_paged_case(len(seq_lens), 6, 2, 8, 4, seq_lens, device, dtype)
    out = backend.paged_attention(q, k_pool, v_pool, table, lens)
    assert out.shape == q.shape
    for b, (k, v) in enumerate(dense):
        expected = ref.attention(q[b:b + 1].float(), k[None].float(), v[None].float())
        torch.testing.assert_close(out[b:b + 1].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", [n for n in ALL if n != "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_attention_parity_with_sdpa(name: str, masked: bool) -> None:
    backend = backend_or_skip(name)
    device, dtype, tol = device_dtype(name)
    if masked and name == "flash":
        pytest.skip("flash takes no arbitrary mask (by design; see streamgen.attention.flash)")
    q = torch.randn(2, 12, 2, 8, device=device, dtype=dtype)
    k = torch.randn(2, 20, 2, 8, device=device, dtype=dtype)
    v = torch.randn(2, 20, 2, 8, device=device, dtype=dtype)
    mask = None
    if masked:  # block-causal-like pattern plus random holes; every row keeps key 0
        mask = torch.rand(2, 1, 12, 20, device=device) > 0.4
        mask[..., 0] = True
    expected = get_backend("sdpa").attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(backend.attention(q, k, v, mask).float(), expected, atol=tol, rtol=tol)


def test_flex_accepts_a_2d_mask_and_rejects_a_bad_one() -> None:
    flex, sdpa = get_backend("flex"), get_backend("sdpa")
    q, k, v = torch.randn(1, 6, 1, 4), torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4)
    mask = torch.ones(6, 9, dtype=torch.bool).tril(3)
    torch.testing.assert_close(flex.attention(q, k, v, mask), sdpa.attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mask must be"):
        flex.attention(q, k, v, torch.ones(1, 1, 5, 9, dtype=torch.bool))


@pytest.mark.slow
def test_compiled_flex_matches_sdpa() -> None:
    """torch.compile(flex_attention) on CPU: ~10-20 s of compilation on 2 cores, hence slow."""
    flex = get_backend("flex", compile=True)
    q, k_pool, v_pool, table, lens, dense = random_paged_case(2, 8, 2, 16, 4, [16, 16], "cpu", torch.float32)
    out = flex.paged_attention(q, k_pool, v_pool, table, lens)
    for b, (k, v) in enumerate(dense):
        expected = get_backend("sdpa").attention(q[b:b + 1], k[None], v[None])
        torch.testing.assert_close(out[b:b + 1], expected, atol=1e-5, rtol=1e-5)


def test_paged_inputs_are_validated() -> None:
    q, k_pool, v_pool, table, lens, _ = random_paged_case(2, 3, 2, 4, 4, [5, 8], "cpu", torch.float32)
    sdpa = get_backend("sdpa")
    with pytest.raises(ValueError, match="block_table must be int32"):
        sdpa.paged_attention(q, k_pool, v_pool, table.long(), lens)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        sdpa.paged_attention(q, k_pool, v_pool, table, lens.long())
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=99 must lie in \[1, max_blocks \* page = 12\]"):
        check_paged_inputs(q, k_pool, v_pool, table, torch.tensor([5, 99], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match the pool"):
        sdpa.paged_attention(torch.randn(2, 3, 1, 4), k_pool, v_pool, table, lens)
    with pytest.raises(ValueError, match="does not match pool dtypes"):
        sdpa.paged_attention(q.double(), k_pool, v_pool, table, lens)
