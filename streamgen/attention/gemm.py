"""CPU backend: attention written as two batched GEMMs around a softmax, in query blocks.

At a CPU chunk's shapes (a few hundred queries against a window of a few hundred to a few thousand
keys, head dim 64) PyTorch's CPU flash-attention kernel runs bfloat16 at a fifth to a third of the rate
of a bfloat16 GEMM: it gains little from the CPU's bf16 units, because it multiplies small tiles and
rescales its running softmax between them. Here the scores of a block of queries against all keys are
one batched GEMM (``Q K^T``), the softmax one vectorised pass over them, and the output a second
batched GEMM (``P V``); both GEMMs run at the BLAS's full rate. docs/speed.md has the measurements.

The backend takes this path only where it measured faster (:func:`prefers_gemm`: bfloat16 on a CPU with
native bf16 GEMMs, against at least :data:`MIN_KEYS` keys; alone, 0.87-2.1x SDPA's speed depending on the
run and the key count, ``benchmarks/cpu_kernels.py --keys``) and hands every other call (float32, a GPU,
cross-attention's few text tokens, any call on a CPU whose bf16 GEMMs are emulated) to SDPA's kernel
unchanged. It is the ``auto`` choice of a CPU with native bf16: in the engine a bf16 chunk is 1.13-1.27x
faster, in every alternated round but one (``benchmarks/attention_ab.py``; docs/speed.md).

Precision: in bfloat16 the scores and the probabilities are rounded to bfloat16 between the steps
(flash-attention keeps the scores in float32 and rounds only the probabilities), so the error is a
few times SDPA's own bf16 error; ``tests/attention/test_gemm.py`` bounds it against a float64
reference. In float32 :func:`attention_gemm` equals SDPA to float32 rounding.

Memory: the scores of one block are ``B x H x block x Lk`` values; blocks are sized so that they stay
under :data:`SCORE_BUDGET` elements (a wan-1.3b forward on a CPU, ~4,700 queries x 33,000 keys x 12
heads, would need ~1.8 G otherwise). Paged K/V are gathered as for SDPA.
"""

from __future__ import annotations

import math

import torch

from streamgen import precision
from streamgen.attention.sdpa import SDPABackend

# Score elements per block (B x H x queries x keys): 4 Mi values is 8 MiB in bf16, far below any machine's
# memory, while a steady-state chunk of the default preset (1 x 4 x 192 x 768 = 0.6 Mi; four batched
# streams 2.4 Mi) is one block: smaller blocks measured slower (more, smaller GEMMs).
SCORE_BUDGET = 4 * 2**20
# Fewest keys for which the GEMM path beats SDPA in bf16 (cross-attention's text tokens stay on SDPA).
MIN_KEYS = 128


def attention_gemm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None, score_budget: int = SCORE_BUDGET) -> torch.Tensor:
    """Softmax attention over ``[B, L, H, D]`` tensors (``mask``: bool, True = may attend, broadcastable
    to ``[B, H, Lq, Lk]``); returns ``[B, Lq, H, D]``."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if score_budget < 1:
        raise ValueError(f"score_budget must be >= 1, got {score_budget}")
    qh = q.transpose(1, 2) * (1.0 / math.sqrt(d))  # [B, H, Lq, D]; the scale folded into the small operand
    kt = k.permute(0, 2, 3, 1).contiguous()  # [B, H, D, Lk]: a copy of K is cheaper than a strided GEMM read
    vh = v.transpose(1, 2)  # [B, H, Lk, D]
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    block = max(1, min(lq, score_budget // max(1, b * h * lk)))

    def rows(start: int, stop: int) -> torch.Tensor:  # [B, H, stop - start, D]
        scores = torch.matmul(qh[:, :, start:stop], kt)  # [B, H, rows, Lk]
        if mask is not None:
            scores = scores.masked_fill(~mask[..., start:stop, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), vh)

    if block >= lq:  # one block (a CPU chunk's steady state): no output buffer, the transposed view as SDPA's
        return rows(0, lq).transpose(1, 2)
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
    for start in range(0, lq, block):
        stop = min(lq, start + block)
        out[:, start:stop] = rows(start, stop).transpose(1, 2)
    return out


def prefers_gemm(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`attention_gemm` is the faster exact path for this call: bfloat16 on a CPU with native
    bf16 GEMMs (:func:`streamgen.precision.bf16_gemms_native`), against at least :data:`MIN_KEYS` keys. Without
    them the GEMMs are emulated: a chunk's bf16 attention took 110 ms this way against 2.0 ms in SDPA on a 2-core
    AVX2 AMD EPYC (``benchmarks/cpu_kernels.py``). In float32 SDPA's kernel is as fast (its tiles run at the
    fp32 GEMM rate already), and against a few keys (the text tokens of cross-attention) its single pass wins."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[1] >= MIN_KEYS
            and precision.bf16_gemms_native())


class GemmBackend(SDPABackend):
    """Dense attention as GEMM - softmax - GEMM where that is faster (:func:`prefers_gemm`), SDPA's
    kernel for every other call; paged K/V gathered as the SDPA reference does."""

    name = "gemm"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        if prefers_gemm(q, k):
            return attention_gemm(q, k, v, mask)
        return super().attention(q, k, v, mask)

    @staticmethod
    def paged_layout(block_size_tokens: int, *, masked: bool, device: torch.device) -> str:
        return "gather (gemm has no paged kernel: it reads a contiguous copy of the pages)"


def create() -> GemmBackend:
    return GemmBackend()
