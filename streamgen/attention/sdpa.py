"""Reference backend: PyTorch ``scaled_dot_product_attention``. Runs everywhere.

Paged K/V are gathered back into contiguous tensors and handed to SDPA: on CPU the gather
of a window of pages costs far less than the attention itself, and it keeps this backend
the obviously-correct reference the others are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamgen.attention.paged_common import HostLengths, check_paged_inputs, gather_visible


class SDPABackend:
    """Dense attention via SDPA; the reference every other backend is tested against."""

    name = "sdpa"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        # [B, L, H, D] -> [B, H, L, D] for SDPA, and back.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)

    @staticmethod
    def paged_layout(block_size_tokens: int, *, masked: bool, device: torch.device) -> str:
        return "gather (sdpa has no paged kernel: the reference reads a contiguous copy of the pages)"

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        kv_valid: torch.Tensor | None = None, *,
                        lengths: HostLengths | None = None) -> torch.Tensor:
        """Gather each row's visible keys, run SDPA. Shapes as in the protocol."""
        lens = check_paged_inputs(q, k_pool, v_pool, block_table, seq_lens, kv_valid, lengths=lengths)
        k, v, counts = gather_visible(k_pool, v_pool, block_table, lens, kv_valid, lengths)  # [B, max_n, H, D]
        if all(n == counts[0] for n in counts):
            # Steady state of a rolling window: every session sees the same number of keys,
            # so one unmasked batched call (SDPA's fast path) does the whole batch.
            return self.attention(q, k[:, :counts[0]], v[:, :counts[0]])
        # Ragged lengths: one unmasked call per session. A padded batch with a key mask would
        # push SDPA onto its slower masked path and waste work on padding.
        return torch.cat([self.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
                          for b, n in enumerate(counts)], dim=0)


def create() -> SDPABackend:
    return SDPABackend()
