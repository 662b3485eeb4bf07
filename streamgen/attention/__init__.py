"""Attention backends: an enum of names and a registry of one module per backend.

A backend is chosen once, by name, and passed to whoever needs it (the model, a cache);
there is no global "current backend". An unknown name raises ``ValueError`` listing the
valid names; a known backend that cannot run here (no CUDA, package missing) raises
:class:`BackendUnavailableError` saying why. Nothing ever falls back silently.
"""

from __future__ import annotations

import enum
import importlib
from typing import Any, Protocol

import torch

from streamgen.attention.paged_common import HostLengths
from streamgen.config import ATTENTION_CHOICES


class BackendUnavailableError(RuntimeError):
    """A known attention backend cannot run on this machine; the message says why."""


class AttentionBackendName(enum.StrEnum):
    SDPA = "sdpa"
    GEMM = "gemm"
    FLEX = "flex"
    XFORMERS = "xformers"
    FLASH = "flash"


class AttentionBackend(Protocol):
    """Attention over ``[B, L, H, D]`` tensors (sequence-major, as the model holds them).

    ``attention`` takes dense K/V; ``paged_attention`` takes K/V living in a paged pool
    (:mod:`streamgen.cache.block_pool`) addressed by a vLLM-style block table, so a backend
    with a paged kernel never copies the cache and one without can gather pages itself.
    """

    name: str

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q: [B, Lq, H, D]``, ``k, v: [B, Lk, H, D]``, ``mask``: bool ``[Lq, Lk]`` or
        ``[B, 1, Lq, Lk]`` (True = may attend) or ``None``. Returns ``[B, Lq, H, D]``."""
        ...

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        kv_valid: torch.Tensor | None = None, *,
                        lengths: HostLengths | None = None) -> torch.Tensor:
        """Every query of sequence ``b`` attends (no mask) to the visible keys of its pages.

        ``q: [B, Lq, H, D]``; ``k_pool, v_pool: [num_blocks, page, H, D]`` (one layer);
        ``block_table``: int32 ``[B, max_blocks]``, row ``b`` lists the pages holding key
        positions ``0, page, 2 * page, ...`` (padded with the null block 0); ``seq_lens``:
        int32 ``[B]``. Visible keys: the first ``seq_lens[b]`` positions when ``kv_valid`` is
        ``None``; otherwise the positions where ``kv_valid`` (bool ``[B, max_blocks * page]``)
        is True -- a page may then hold dead tokens anywhere (a frame evicted by the window
        next to a live one) -- all of them below ``seq_lens[b]``. Returns ``[B, Lq, H, D]``.
        ``lengths``: the same lengths as Python ints, when the caller has them (the KV manager
        does): a backend that needs them on the host then never reads them back from the device.
        """
        ...

    def paged_layout(self, block_size_tokens: int, *, masked: bool, device: torch.device) -> str:
        """``"direct"`` if :meth:`paged_attention` reads pages in place for a call with this page
        size (``masked``: a ``kv_valid`` mask is passed) on ``device``; otherwise ``"gather (why)"``:
        the pages are copied into dense K/V first. Counted by the cache, shown in ``/metrics``."""
        ...


_MODULES: dict[AttentionBackendName, str] = {
    AttentionBackendName.SDPA: "streamgen.attention.sdpa",
    AttentionBackendName.GEMM: "streamgen.attention.gemm",
    AttentionBackendName.FLEX: "streamgen.attention.flex",
    AttentionBackendName.XFORMERS: "streamgen.attention.xformers",
    AttentionBackendName.FLASH: "streamgen.attention.flash",
}


# ``auto`` (the CLIs' default; ATTENTION_CHOICES lives in streamgen.config so --help needs no torch) is not a
# backend: :func:`resolve_attention` turns it into one for a device.


def resolve_attention(name: str, device: torch.device | str) -> tuple[str, str]:
    """The backend to build for ``name`` on ``device``, and why: ``auto`` is ``gemm`` on a CPU with native bf16
    GEMMs (GEMM - softmax - GEMM where it beats PyTorch's CPU kernel, that kernel elsewhere; docs/speed.md),
    ``sdpa`` on a CPU without them (where the GEMM path never wins) and on other devices (PyTorch's fused
    kernels). Any other name is checked and returned as given."""
    if name == "auto":
        if torch.device(device).type == "cpu":
            from streamgen import precision

            if precision.bf16_gemms_native():
                return "gemm", "auto: CPU (bf16 attention as two GEMMs around a softmax, else SDPA)"
            return "sdpa", "auto: CPU without native bf16 GEMMs (SDPA's kernel is the faster one in every dtype)"
        return "sdpa", f"auto: {torch.device(device).type} (PyTorch's fused SDPA kernels)"
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_CHOICES)}")
    return name, "asked for"


def get_backend(name: str | AttentionBackendName, **options: Any) -> AttentionBackend:
    """Build the backend called ``name``; raises ``ValueError`` or :class:`BackendUnavailableError`.

    ``options`` go to the backend module's ``create()`` (e.g. ``compile=True`` for ``flex``).
    """
    try:
        key = AttentionBackendName(name)
    except ValueError:
        valid = ", ".join(b.value for b in AttentionBackendName)
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {valid}") from None
    try:
        module = importlib.import_module(_MODULES[key])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("streamgen"):
            raise BackendUnavailableError(f"attention backend {key.value!r} is not implemented yet") from exc
        raise
    return module.create(**options)  # each backend module checks its own constraints in create()
