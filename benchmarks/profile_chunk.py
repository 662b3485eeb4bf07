"""Where a steady-state chunk's CPU time goes: ``torch.profiler`` over a few chunks of one stream.

    python benchmarks/profile_chunk.py                       # default preset, dtype auto, 2 threads
    python benchmarks/profile_chunk.py --dtype float32 --chunks 8 --top 25
    python benchmarks/profile_chunk.py --streams 8                # 8 streams batched, as a loaded server runs

Builds the engine as ``benchmarks/engine.py`` does (random weights: speed does not depend on them), runs
``--warmup`` chunks so the rolling window is full, then profiles ``--chunks`` chunks of the same stream
(with ``--streams N``, N streams started together, batched by the scheduler as a loaded server batches
them; a "chunk" is then one chunk of every stream, and the per-chunk figures are for all N).
Every operator's *self* time is put in one group (GEMMs, attention, element-wise, dtype casts and copies,
normalisation, the paged cache's gathers and writes, convolutions, other) so the shares add up to 100 %
of the profiled operators' time; the wall time per chunk is printed beside it (the profiler's own
overhead makes it a little slower than ``engine.py``'s). Prints one JSON document, then a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trees import cpu_description  # noqa: E402
from engine import PROMPTS, build  # noqa: E402

from streamgen.attention import resolve_attention  # noqa: E402
from streamgen.config import ATTENTION_CHOICES, get_preset  # noqa: E402
from streamgen.engine.request import GenerationRequest  # noqa: E402
from streamgen.model.prepack import LINEAR_KERNELS, resolve_linear  # noqa: E402
from streamgen.model.quantize import QUANTIZE_MODES  # noqa: E402
from streamgen.model.text import HashTokenEncoder, TextEncoder  # noqa: E402
from streamgen.precision import DTYPE_NAMES, resolve_dtype  # noqa: E402

# Operator name -> group; the first pattern contained in the name wins, so the specific ones come first.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "bmm")),
    ("gemm", ("addmm", "aten::mm", "matmul", "linear", "quantized::linear")),  # mkldnn::_linear_pointwise too
    ("convolution", ("conv", "mkldnn_convolution")),
    ("normalisation", ("layer_norm", "rms_norm", "group_norm", "native_layer_norm", "norm")),
    ("cache", ("index_select", "index_copy", "index_put", "gather", "scatter", "aten::cat", "aten::stack")),
    ("cast_copy", ("aten::to", "_to_copy", "copy_", "contiguous", "clone", "empty", "zeros", "ones")),
    ("elementwise", ("gelu", "silu", "sigmoid", "tanh", "mul", "add", "sub", "div", "neg", "exp", "rsqrt",
                     "pow", "sin", "cos", "where", "clamp", "quantize", "mean", "sum", "erf")),
)


def group_of(name: str) -> str:
    for group, patterns in GROUPS:
        if any(p in name for p in patterns):
            return group
    return "other"


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help="as `streamgen serve --attention`")
    p.add_argument("--warmup", type=int, default=6, help="chunks before profiling (fills the rolling window)")
    p.add_argument("--chunks", type=int, default=6, help="chunks profiled")
    p.add_argument("--top", type=int, default=15, help="operators listed by self time")
    p.add_argument("--streams", type=int, default=1, help="concurrent streams, batched by the scheduler")
    p.add_argument("--linear", choices=LINEAR_KERNELS, default="auto", help="as `streamgen serve --linear`")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.warmup < 0 or args.streams < 1:
        p.error("--chunks and --streams must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    choice = resolve_dtype(args.dtype, torch.device("cpu"))
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=HashTokenEncoder(preset.model.text_dim))
    attention, _ = resolve_attention(args.attention, torch.device("cpu"))
    linear = resolve_linear(args.linear, torch.device("cpu"), dtype=choice.dtype, quantize=args.quantize).kernel
    engine = build(preset, text, choice.dtype, args.quantize, attention=attention, linear=linear,
                   max_sessions=max(8, args.streams))
    frames_per_chunk = preset.pixel_frames(preset.sampler.chunk_frames)
    total = args.warmup + args.chunks
    for i in range(args.streams):
        engine.add_request(GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=i,
                                             num_frames=(total + 2) * frames_per_chunk))

    def chunks(n: int) -> float:
        """Run until every stream delivered ``n`` more chunks (one chunk = one chunk of each stream)."""
        t0, done = time.perf_counter(), 0
        while done < n * args.streams:
            done += sum(1 for out in engine.step() if len(out.frames))
        return time.perf_counter() - t0

    chunks(args.warmup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = chunks(args.chunks)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    result: dict[str, object] = {
        "cpu": cpu_description(), "preset": args.preset, "threads": args.threads, "dtype": choice.name,
        "dtype_reason": choice.reason, "quantize": args.quantize, "attention": attention, "linear": linear,
        "streams": args.streams,
        "chunks": args.chunks,
        "wall_s_per_chunk": wall / args.chunks,
        "groups_share": {g: v / total_us for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "group": group_of(e.key), "calls_per_chunk": e.count / args.chunks,
                     "self_ms_per_chunk": e.self_cpu_time_total / 1e3 / args.chunks,
                     "share": e.self_cpu_time_total / total_us} for e in top],
    }
    print(json.dumps(result, indent=2))
    print(f"\n{result['cpu']}; {choice.name}, attention {attention}, {args.threads} threads; "
          f"{args.streams} stream(s); {result['wall_s_per_chunk'] * 1e3:.1f} ms per chunk (profiled)")
    for g, share in result["groups_share"].items():  # type: ignore[union-attr]
        print(f"  {g:<14} {100 * share:5.1f} %")
    print(f"\n{'operator':<44} {'group':<13} {'calls':>6} {'ms/chunk':>9} {'share':>7}")
    for row in result["top_ops"]:  # type: ignore[union-attr]
        print(f"{row['op'][:44]:<44} {row['group']:<13} {row['calls_per_chunk']:6.0f} "
              f"{row['self_ms_per_chunk']:9.2f} {100 * row['share']:6.1f}%")
    return result


if __name__ == "__main__":
    main()
