"""The transformer's CPU kernels at a chunk's shapes, in float32 and bfloat16 side by side: where a CPU chunk goes.

    python benchmarks/cpu_kernels.py                 # default preset, 2 threads
    python benchmarks/cpu_kernels.py --threads 1

(Not ``kernels.py``: the benchmarks folder is on the tests' import path, where that name would shadow the
``kernels`` package that transformers and diffusers import.)

Times, for one block of the preset at a steady-state chunk (``chunk_frames`` query frames against the
rolling window's ``window_frames`` key frames), each kernel in both dtypes: the self-attention through
``F.scaled_dot_product_attention`` (what the engine's CPU backend calls), the same attention written out
(float32 scores and softmax as flash-attention keeps them, then P.V in the model's dtype: the
alternative docs/speed.md reports as not reliably faster), the CPU backend's GEMM - softmax - GEMM path
(:func:`streamgen.attention.gemm.attention_gemm`, bf16 scores), the QKV and FFN GEMMs (``F.linear`` and,
where oneDNN runs, the prepacked linears serving uses: ``_onednn``), and the tanh-GELU as PyTorch computes
it against the float32 sigmoid form (:func:`streamgen.model.transformer.gelu_tanh`; for bf16, widened to
float32 and rounded back, the variant docs/speed.md reports as not kept). Each timing is the median of
``--repeats`` calls, the kernels interleaved so load from other jobs hits them alike; GFLOP/s figures
pass :func:`streamgen.perf.utilisation` against the machine's fastest measured matmul rate in either dtype
(a bf16 kernel may widen to float32 inside: PyTorch's CPU attention does on a CPU without native bf16, where
it runs ~5x faster than that CPU's bf16 GEMMs), so one above it raises instead of printing. Prints one JSON
document, then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamgen.attention.gemm import attention_gemm
from streamgen.config import get_preset
from streamgen.model.prepack import PrepackedLinear, onednn_unavailable
from streamgen.model.transformer import gelu_tanh
from streamgen.perf import best_matmul_peak_flops, utilisation

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from compare_trees import cpu_description  # noqa: E402  (a sibling script: the CPU model and its bf16 flags)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with float32 scores and softmax, P.V in the inputs' dtype (``[B, H, L, D]``)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, -1).to(q.dtype), v)


def kernels(preset_name: str, dtype: torch.dtype,
            keys: int | None = None) -> dict[str, tuple[Callable[[], object], float]]:
    """name -> (a call, its matmul FLOPs) at the preset's steady-state chunk shapes."""
    preset = get_preset(preset_name)
    m = preset.model
    tokens = preset.tokens_per_frame
    lq, lk = tokens * preset.sampler.chunk_frames, keys or tokens * (preset.cache.window_frames or 12)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, m.num_heads, lq, m.head_dim, generator=g).to(dtype)
    k = torch.randn(1, m.num_heads, lk, m.head_dim, generator=g).to(dtype)
    v = torch.randn(1, m.num_heads, lk, m.head_dim, generator=g).to(dtype)
    x = torch.randn(lq, m.dim, generator=g).to(dtype)
    w_qkv = torch.randn(3 * m.dim, m.dim, generator=g).to(dtype)
    w_up = torch.randn(m.ffn_dim, m.dim, generator=g).to(dtype)
    w_down = torch.randn(m.dim, m.ffn_dim, generator=g).to(dtype)
    h = torch.randn(lq, m.ffn_dim, generator=g).to(dtype)
    attn_flops = 4.0 * m.num_heads * lq * lk * m.head_dim
    q_blhd, k_blhd, v_blhd = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    packed: dict[str, tuple[Callable[[], object], float]] = {}
    if onednn_unavailable(dtype) is None:  # the serving default on a CPU (--linear auto): weights reordered once
        for name, w, inp in (("qkv", w_qkv, x), ("ffn_up", w_up, x), ("ffn_down", w_down, h)):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
            layer.weight.data.copy_(w)
            pl = PrepackedLinear(layer, lq)
            packed[f"gemm_{name}_onednn"] = (lambda pl=pl, inp=inp: pl(inp), 2.0 * lq * w.shape[0] * w.shape[1])
    with torch.no_grad():
        return {
            "attention_sdpa": (lambda: F.scaled_dot_product_attention(q, k, v), attn_flops),
            "attention_explicit": (lambda: explicit_attention(q, k, v), attn_flops),
            # The CPU backend's path (``--attention gemm``), on the [B, L, H, D] layout the model hands it.
            "attention_gemm": (lambda: attention_gemm(q_blhd, k_blhd, v_blhd), attn_flops),
            "gemm_qkv": (lambda: F.linear(x, w_qkv), 2.0 * lq * m.dim * 3 * m.dim),
            "gemm_ffn_up": (lambda: F.linear(x, w_up), 2.0 * lq * m.dim * m.ffn_dim),
            "gemm_ffn_down": (lambda: F.linear(h, w_down), 2.0 * lq * m.ffn_dim * m.dim),
            **packed,
            "gelu_torch": (lambda: F.gelu(h, approximate="tanh"), 0.0),
            "gelu_sigmoid_form": (lambda: gelu_tanh(h.float()).to(dtype), 0.0),
        }


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the calls alternated ``repeats`` times after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--keys", type=int, help="attention keys (default: the preset's full rolling window)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or (args.keys is not None and args.keys < 1):
        p.error("--threads, --repeats and --keys must be >= 1")
    torch.set_num_threads(args.threads)
    report: dict[str, object] = {"cpu": cpu_description(), "preset": args.preset, "threads": args.threads,
                                 "keys": args.keys,
                                 "dtypes": {}}
    dtypes = (torch.float32, torch.bfloat16)
    peaks = {dtype: best_matmul_peak_flops(dtype) for dtype in dtypes}
    # Any kernel may compute in the faster dtype inside, so the bound for every kernel is the faster peak.
    peak = max(peaks.values())
    report["of_peak_denominator_gflops"] = peak / 1e9
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        table = kernels(args.preset, dtype, args.keys)
        seconds = time_interleaved({k: call for k, (call, _) in table.items()}, args.repeats)
        per = {}
        for kernel, (_, flops) in table.items():
            entry: dict[str, float] = {"ms": seconds[kernel] * 1e3}
            if flops:
                entry["gflops"] = flops / seconds[kernel] / 1e9
                entry["of_peak"] = utilisation(flops, seconds[kernel], peak, what=f"{kernel} ({name})")
            per[kernel] = entry
        report["dtypes"][name] = {"matmul_peak_gflops": peaks[dtype] / 1e9, "kernels": per}
    print(json.dumps(report, indent=2))
    print(f"\n{report['cpu']}, {args.threads} thread(s), preset {args.preset}, median of {args.repeats}")
    print(f"{'kernel':20} {'fp32 ms':>9} {'GFLOP/s':>8} {'bf16 ms':>9} {'GFLOP/s':>8}")
    f32, b16 = report["dtypes"]["float32"]["kernels"], report["dtypes"]["bfloat16"]["kernels"]
    nan = float("nan")
    for kernel in dict.fromkeys([*f32, *b16]):  # a dtype oneDNN cannot pack here has no `_onednn` rows
        a, b = f32.get(kernel, {}), b16.get(kernel, {})
        print(f"{kernel:20} {a.get('ms', nan):>9.3f} {a.get('gflops', nan):>8.0f} "
              f"{b.get('ms', nan):>9.3f} {b.get('gflops', nan):>8.0f}")
    return report


if __name__ == "__main__":
    main()
