"""``torch.compile`` of the DiT blocks for serving (``--compile``), applied after loading, never at import.

Inductor fuses the blocks' element-wise work (LayerNorm in float32, adaLN modulation, gates, RoPE,
GELU) into a few kernels; on a CPU that work costs about as much as the GEMMs. Self-attention through
the KV cache stays eager (:func:`streamgen.model.transformer.cache_attention` is excluded from
tracing), so cache bookkeeping never triggers a re-compile. Compiled kernels are cached on disk
(Inductor's FX graph and AOTAutograd caches, under ``cache_dir``).

Measured on a 2-core AVX2 AMD EPYC under load from other jobs (default preset, float32, 1 thread,
16 chunks): compiled chunks equal eager ones to 1e-7 relative and ran 1.26x faster (1.08 vs 1.36 s),
but the first chunk waited 99 s for compilation and a second process with the cache filled still 115 s
(re-tracing 8 blocks dominates). Re-measured after GELU became cheap in eager mode: 0-10 % per chunk,
second start 37 s (dynamic) or 6.4 s (fixed shapes; docs/speed.md). So ``--compile`` is off by default:
worth it only for long-lived servers.
On CUDA it compiles with ``mode="max-autotune-no-cudagraphs"`` (see :func:`compile_options`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "streamgen" / "inductor"


def compile_blocks(model: nn.Module, cache_dir: Path | None = None) -> nn.Module:
    """Compile each of ``model.blocks`` in place (dynamic batch and length) and return ``model``.

    ``cache_dir`` (default ``~/.cache/streamgen/inductor``; ``$TORCHINDUCTOR_CACHE_DIR`` wins if set) holds
    the compiled kernels between processes. Raises ``RuntimeError`` naming the missing piece if this torch
    build cannot compile (Inductor needs a C++ compiler on a CPU).
    """
    if not hasattr(model, "blocks"):
        raise TypeError(f"compile_blocks expects a CausalWanTransformer, got {type(model).__name__}")
    # Inductor fixes its cache directory in the environment the first time it looks (some imports do),
    # so set it before importing any of it.
    if cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_CACHE_DIR))
    if next(model.parameters()).device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as err:  # the builder raises its own types; the message names the compiler
            raise RuntimeError(f"--compile on CPU needs a C++ compiler for torch.compile (Inductor): {err}; "
                               "install g++ or run without --compile") from err
    # One entry per block (the blocks share code but not parameters) and per shape family.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(model.blocks))
    options = compile_options(next(model.parameters()).device)
    for block in model.blocks:
        block.compile(**options)
    return model


def compile_options(device: torch.device) -> dict[str, object]:
    """``torch.compile`` arguments for the blocks on ``device``.

    CPU: ``dynamic=True`` (one kernel family for every batch and chunk length; Inductor's C++ code).
    CUDA: ``mode="max-autotune-no-cudagraphs"``: Inductor benchmarks Triton/cuBLAS GEMM and fused
    element-wise configurations for the shapes it sees (a chunk is a fixed number of tokens, so the
    shapes repeat: one per chunk length and batch size), without CUDA graphs (the paged attention
    between the compiled pieces stays eager, and its block tables change every step). ``dynamic=None``
    compiles the first shape statically and generalises only a dimension that changes.
    """
    if device.type == "cuda":
        return {"mode": "max-autotune-no-cudagraphs", "dynamic": None}
    return {"dynamic": True}


def prepare_for_inference(model: nn.Module, *, quantize: str = "none", compile: bool = False, linear: str = "aten",
                          rows_hint: int | None = None) -> nn.Module:
    """The serving speed-ups a user asked for, in their only valid order: INT8 or prepacked linears, then compile.

    ``model`` must already be in its serving dtype and device (INT8 needs float32 on a CPU and says so).
    ``linear``: the *resolved* kernel (:func:`streamgen.model.prepack.resolve_linear`), ``"onednn"`` or
    ``"aten"``; ``"onednn"`` needs ``rows_hint``, the chunk's token count.
    """
    from streamgen.model.prepack import prepack_linears, resolve_linear
    from streamgen.model.quantize import quantize_transformer

    if linear not in ("onednn", "aten"):
        raise ValueError(f"prepare_for_inference takes a resolved linear kernel (onednn or aten), got {linear!r}")
    if linear == "onednn":  # the same checks as resolving it: a combination that cannot run is a ValueError
        param = next(model.parameters())
        resolve_linear("onednn", param.device, dtype=param.dtype, quantize=quantize, compile=compile)
        if rows_hint is None:
            raise ValueError("linear=onednn needs rows_hint (the chunk's token count)")
    model = quantize_transformer(model, quantize)
    if linear == "onednn":
        prepack_linears(model, rows_hint)  # type: ignore[arg-type]
    return compile_blocks(model) if compile else model
