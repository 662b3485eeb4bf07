"""Attention backends: registry behaviour, and every runnable backend against the SDPA reference.

Backends that cannot run here (xformers and flash need their packages and CUDA) are skipped
with the exact reason their ``create()`` gives, never silently.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamgen.attention import AttentionBackend, AttentionBackendName, BackendUnavailableError, get_backend
from streamgen.attention.flash import FlashBackend
from streamgen.attention.flex import FlexBackend
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
    with pytest.raises(ValueError, match="valid backends: sdpa, gemm, flex, xformers, flash"):
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
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert XFormersBackend.paged_layout(128) == "direct"
    assert XFormersBackend.paged_layout(1560).startswith("gather (page of 1560 tokens is not a multiple of 64")
    assert XFormersBackend.paged_layout(256, masked=True) == "split"
    assert FlashBackend.paged_layout(512) == "direct"
    assert FlashBackend.paged_layout(256, masked=True) == "split"  # the cache cuts masked calls (PagedSplit)
    assert FlashBackend.paged_layout(64).startswith("gather (page of 64 tokens is not a multiple of 256")
    assert get_backend("sdpa").paged_layout(256, masked=False, device=cpu).startswith("gather (sdpa has no paged")
    # flex: direct (with or without dead tokens) on CUDA once compiled; gathers on a CPU unless forced.
    assert FlexBackend(compile=True).paged_layout(256, masked=True, device=cuda) == "direct"
    assert FlexBackend(compile=False).paged_layout(256, masked=True, device=cuda).startswith("gather (flex is not")
    assert FlexBackend(compile=True).paged_layout(1560, masked=False, device=cuda).startswith(
        "gather (page of 1560 tokens is not a multiple of flex's 128-token block")
    assert FlexBackend().paged_layout(256, masked=False, device=cpu).startswith("gather (eager flex on a CPU")
    assert FlexBackend(paged="direct").paged_layout(256, masked=True, device=cpu) == "direct"
    with pytest.raises(ValueError, match="unknown flex paged mode 'fused'; valid: auto, direct, gather"):
        FlexBackend(paged="fused")


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


def masked_paged_case(page: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rows whose visible tokens have holes inside pages, as a rolling window with sinks leaves them:
    row 0 = sink tokens [0, 10) of its first page, a window starting mid-page, a partly written last
    page; row 1 = a prefix with a ragged end. Returns q, pools, table, seq_lens, kv_valid, dense k/v."""
    heads, head_dim, num_blocks = 2, 8, 9
    k_pool = torch.randn(num_blocks, page, heads, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn(num_blocks, page, heads, head_dim, device=device, dtype=dtype)
    table = torch.tensor([[4, 7, 2, 5], [8, 3, 0, 0]], dtype=torch.int32)
    valid = torch.zeros(2, 4 * page, dtype=torch.bool)
    valid[0, :10] = True                                 # sinks: head of page 4, the rest of it evicted
    valid[0, page + page // 3:3 * page] = True           # window head inside page 7, all of page 2
    valid[0, 3 * page:3 * page + page // 2] = True       # chunk tail: half of page 5 written
    valid[1, :page + 5] = True
    lens = torch.tensor([3 * page + page // 2, page + 5], dtype=torch.int32)
    dense = []
    for b in range(2):
        rows = table[b].tolist()
        dense.append((k_pool[rows].flatten(0, 1)[valid[b]], v_pool[rows].flatten(0, 1)[valid[b]]))
    q = torch.randn(2, 7, heads, head_dim, device=device, dtype=dtype)
    return q, k_pool, v_pool, table.to(device), lens.to(device), valid.to(device), dense


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("page", [4, 256], ids=["page4", "page256"])
def test_masked_paged_attention_matches_dense_sdpa(name: str, page: int) -> None:
    """Dead tokens inside pages (``kv_valid``) are never attended, by any backend, on the same pages."""
    backend = backend_or_skip(name)
    device, dtype, tol = device_dtype(name)
    q, k_pool, v_pool, table, lens, valid, dense = masked_paged_case(page, device, dtype)
    out = backend.paged_attention(q, k_pool, v_pool, table, lens, valid)
    for b, (k, v) in enumerate(dense):
        expected = get_backend("sdpa").attention(q[b:b + 1].float(), k[None].float(), v[None].float())
        torch.testing.assert_close(out[b:b + 1].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("masked", [False, True])
def test_flex_direct_block_mask_reads_only_visible_pages(masked: bool) -> None:
    """The fused path's BlockMask + mask_mod, run eagerly on a CPU (the same mask the Triton kernel gets):
    every other page of the pool is filled with huge values, so any leak would dominate the output."""
    flex, sdpa = get_backend("flex", paged="direct"), get_backend("sdpa")
    q, k_pool, v_pool, table, lens, valid, _ = masked_paged_case(128, "cpu", torch.float32)
    if not masked:
        valid = None
    for block_id in (1, 6):  # pages no row lists
        k_pool[block_id] = 50.0
        v_pool[block_id] = 1e4
    expected = sdpa.paged_attention(q, k_pool, v_pool, table, lens, valid)
    torch.testing.assert_close(flex.paged_attention(q, k_pool, v_pool, table, lens, valid), expected,
                               atol=1e-5, rtol=1e-5)
    built = flex._last_mask
    flex.paged_attention(q, k_pool, v_pool, table, lens, valid)  # the next layer of the same forward
    assert flex._last_mask is built                               # reuses the mask instead of rebuilding it
    mask = flex.paged_block_mask(table, lens, valid, k_pool.shape[0], 128, q.shape[1])
    # row 1 lists pages 8 and 3 (page 3 partly visible); with the ragged end both are partial/full as marked
    assert mask.kv_num_blocks.shape == (2, 1, 1) and mask.full_kv_num_blocks is not None
    listed = [sorted(mask.kv_indices[b, 0, 0, :int(mask.kv_num_blocks[b, 0, 0])].tolist()
                     + mask.full_kv_indices[b, 0, 0, :int(mask.full_kv_num_blocks[b, 0, 0])].tolist())
              for b in range(2)]
    assert listed == [[2, 4, 5, 7], [3, 8]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flex paged kernel needs CUDA (Triton)")
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_flex_direct_on_cuda_matches_sdpa(masked: bool) -> None:
    flex = get_backend("flex", compile=True)
    q, k_pool, v_pool, table, lens, valid, _ = masked_paged_case(256, "cuda", torch.bfloat16)
    if not masked:
        valid = None
    assert flex.paged_layout(256, masked=valid is not None, device=q.device) == "direct"
    out = flex.paged_attention(q, k_pool, v_pool, table, lens, valid)
    expected = get_backend("sdpa").paged_attention(q.float(), k_pool.float(), v_pool.float(), table, lens, valid)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


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
    with pytest.raises(ValueError, match=r"kv_valid must be bool \[B=2, max_blocks \* page = 12\]"):
        sdpa.paged_attention(q, k_pool, v_pool, table, lens, torch.ones(2, 8, dtype=torch.bool))


class _NoHostRead(torch.Tensor):
    """A length tensor that must not be read back to the host (``tolist`` / ``item`` raise)."""

    def tolist(self) -> object:  # type: ignore[override]
        raise AssertionError("a paged-attention call read its lengths back to the host")

    def item(self) -> object:  # type: ignore[override]
        raise AssertionError("a paged-attention call read its lengths back to the host")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("masked", [False, True])
def test_host_lengths_spare_reading_the_lengths(name: str, masked: bool) -> None:
    """Given the lengths as ints (the KV manager's plan carries them), a backend never reads
    ``seq_lens`` or ``kv_valid``'s row counts back from the device (on CUDA each such read is a host
    sync in every layer), with the same result."""
    from streamgen.attention.paged_common import HostLengths

    backend = backend_or_skip(name)
    device, dtype, tol = device_dtype(name)
    q, k_pool, v_pool, table, lens, valid, _ = masked_paged_case(256, device, dtype)
    if not masked:
        valid = None
    expected = backend.paged_attention(q, k_pool, v_pool, table, lens, valid)
    lengths = HostLengths(tuple(int(n) for n in lens.tolist()),
                          None if valid is None else tuple(int(n) for n in valid.sum(dim=1).tolist()))
    guarded_valid = None if valid is None else valid.as_subclass(_NoHostRead)
    out = backend.paged_attention(q, k_pool, v_pool, table, lens.as_subclass(_NoHostRead), guarded_valid,
                                  lengths=lengths)
    torch.testing.assert_close(out.float().as_subclass(torch.Tensor), expected.float(), atol=tol, rtol=tol)
    with pytest.raises(AssertionError, match="read its lengths back"):  # the guard does guard
        backend.paged_attention(q, k_pool, v_pool, table, lens.as_subclass(_NoHostRead), guarded_valid)


class _DeviceWaits(TorchDispatchMode):
    """Records the aten ops whose result the host must wait for on CUDA: reading a value back, or an
    output whose size depends on the data (boolean-mask indexing, nonzero, masked_select)."""

    WAITING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name
        if name in self.WAITING:
            self.seen.append(name)
        if name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if len(args) > 1 else ())):
            self.seen.append("aten::index (boolean mask)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True])
def test_a_paged_call_with_host_lengths_has_no_op_that_waits_for_the_device(masked: bool) -> None:
    """With the plan's host lengths, the gather path (SDPA's; flex's gather and flash/xformers' split tails
    use the same gather_visible and attention_with_lse) runs no op whose result the host must wait for: on
    CUDA each would stall every layer. (Flex's own kernel is a higher-order op this recorder cannot enter.)"""
    from streamgen.attention.paged_common import HostLengths, attention_with_lse, gather_visible

    backend = get_backend("sdpa")
    q, k_pool, v_pool, table, lens, valid, _ = masked_paged_case(256, "cpu", torch.float32)
    if not masked:
        valid = None
    lengths = HostLengths(tuple(int(n) for n in lens.tolist()),
                          None if valid is None else tuple(int(n) for n in valid.sum(dim=1).tolist()))
    with _DeviceWaits() as mode:
        backend.paged_attention(q, k_pool, v_pool, table, lens, valid, lengths=lengths)
        k, v, _ = gather_visible(k_pool, v_pool, table, list(lengths.seq_lens), valid, lengths)
        attention_with_lse(q, k, v, lens if valid is None else valid.sum(dim=1))
    assert mode.seen == []
    with _DeviceWaits() as mode:  # the detector does detect: the old boolean-mask compaction
        k_pool[0][torch.ones(k_pool.shape[1], dtype=torch.bool)]
    assert mode.seen
