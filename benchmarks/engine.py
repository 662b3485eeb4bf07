"""Engine speed on this machine: real-time factor, first frame, long-stream latency, batching, MFU.

    python benchmarks/engine.py                  # default preset, --dtype auto, random weights
    python benchmarks/engine.py --quick          # fewer chunks (smoke run)
    python benchmarks/engine.py --dtype float32  # force a dtype (auto: bf16 only with native CPU bf16)
    python benchmarks/engine.py --device cuda --preset wan-1.3b --hash-text --quick  # on a GPU (bf16)
    python benchmarks/engine.py --quick --emulate-avx2   # an AVX2-only CPU's kernels (float32) on this machine

Everything is measured side by side in one run (these machines are noisy), and printed
as one JSON document followed by a short table:

* ``rtf``: generated pixel fps / playback fps for one stream through the full engine
  (scheduler, paged cache, 4 + 1 forwards per chunk, streaming VAE decode). Target on a CPU (issue 17):
  >= 3.0 in float32 (AVX2-only CPUs, and the fp32 stand-in for them on other CPUs), >= 5.0 in bfloat16
  (CPUs with AVX512-BF16/AMX); ``rtf_target`` says which applies.
* ``chunk_breakdown``: a steady-state chunk's wall time split into its transformer forwards, its
  streaming VAE decode and the rest (scheduler, bookkeeping, frame conversion, Python), medians.
* ``ttff_s``: request added -> first decoded frames (prompt encoding included; the text
  model is loaded and the engine warmed up beforehand, ``warm_up_s``, as the server does before it reports
  SERVING: ``streamgen serve --warm-up-chunks``). Target <= 0.3 s. The engine delivers a stream's
  first latent frame before the rest of its chunk (``EngineConfig.early_first_frames``); ``ttff_early_s`` and
  ``ttff_whole_s`` are medians over fresh streams in two engines, alternated, with the first chunk delivered so
  and whole.
* ``latency_ratio_200_10``: per-chunk time at chunk 200 over chunk 10 with the rolling
  window full. Target <= 1.05.
* ``cache_speedup_21``: per-chunk transformer time of a no-cache baseline that recomputes the
  visible 21-frame context in each of the 4 denoising forwards (block-causal mask), over the
  cached engine's per-chunk transformer time (its 4 denoising forwards + 1 cache write,
  ``ChunkTiming.generate_ms``) at the same 21-frame window. Target >= 3.5.
  ``pipeline_speedup_21`` compares whole chunks instead: the baseline plus the same streaming
  VAE decode, over the cached engine's wall time per chunk (scheduler and decode included).
* ``rtf_ceiling``: the real-time factor a steady-state chunk's transformer forwards (attending to the full
  window) would give at 100 % of the measured matmul peak, with no VAE decode and no overhead: the most any
  engine gets from this machine, so a target above it cannot be met here (``rtf_of_ceiling``: ``rtf`` over it).
* ``batch4_over_1``: aggregate frames/s of 4 batched streams over 1 stream (a CPU forward is
  compute-bound, so this stays near 1.3 there; the batching target is for GPUs).
* ``mfu``: analytic transformer FLOPs / forward time, over the matmul peak measured in the
  same run *in the dtype the model runs* (``streamgen.perf``; ``mfu_peak`` names it: for bf16 forced on a CPU
  whose bf16 GEMMs are emulated, the faster float32 peak, see :func:`peak_held_to`). Target >= 50 %. A figure
  over 100 % (or a real-time factor the GEMM peak cannot allow) raises ``ImpossibleFigure``.
* ``forward_s_3_frames_one_token`` / ``fixed_share_3_frames``: the 3-frame forward with one patch per frame
  (every operator and weight, next to no arithmetic): the forward's fixed cost (dispatch, small operators,
  streaming the weights), and its share of the real 3-frame forward.
* ``join_ttff_s``: a stream that joins three running ones: request -> its first frames, with the
  CPU default (its first chunk runs before the others' work, ``first_chunk_first``) and with every
  stream batched from the start, side by side.
* ``other_dtype``: the same single stream for a few chunks in the other dtype (and its peak),
  so the dtype choice is visible side by side.
* ``linear_aten``: with the prepacked oneDNN linears (``--linear auto`` on a CPU), 6 chunks of the same
  stream with ``F.linear`` and 6 with the prepacked ones, one after the other.

``--emulate-avx2`` re-runs the script with ATen, oneDNN and MKL capped at AVX2 (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) and ``--dtype auto`` meaning float32, as on an AVX2-only CPU:
the same kernels on this machine's cores, caches and memory (not the same machine; ``cpu`` in the JSON says
the caps were on). The peaks are measured under the same caps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import torch

from streamgen import precision
from streamgen.attention import BackendUnavailableError, get_backend, resolve_attention
from streamgen.config import ATTENTION_CHOICES, CacheConfig, Preset, get_preset
from streamgen.device import DEVICE_HELP, device_info, resolve_device, synchronize
from streamgen.engine.engine import Engine, EngineConfig
from streamgen.engine.request import GenerationRequest
from streamgen.model.compile import prepare_for_inference
from streamgen.model.masks import block_causal_mask
from streamgen.model.prepack import LINEAR_KERNELS, resolve_linear
from streamgen.model.quantize import QUANTIZE_MODES, check_quantize
from streamgen.model.text import HashTokenEncoder, TextEncoder
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.perf import best_matmul_peak_flops, realtime_factor, transformer_forward_flops, utilisation
from streamgen.precision import DTYPE_NAMES, DtypeChoice, resolve_dtype

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from compare_trees import cpu_description, emulate_avx2  # noqa: E402  (a sibling script)

PROMPTS = ["a glossy red bottle turning slowly on a white table", "a matte blue mug on a wooden table",
           "a green can on a kitchen counter, camera zooming in", "a white box in a dark studio"]


def build(preset: Preset, text: TextEncoder, dtype: torch.dtype, quantize: str = "none",
          device: torch.device | None = None, kv_memory_bytes: int = 256 * 2**20, attention: str = "sdpa",
          linear: str = "aten", **engine_kw: Any) -> Engine:
    """An engine over random weights, prepared as ``streamgen serve`` prepares its model (``linear``: the
    resolved kernel, onednn or aten)."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    # Built and drawn on the device: random weights only set the speed, and initialising wan-1.3b's 1.4B
    # parameters on a CPU takes ~80 s on 2 cores, per engine.
    with device:
        model = CausalWanTransformer(preset.model, attention)
        with torch.no_grad():  # random weights with a non-zero head, so the math is not degenerate
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model = prepare_model(model.to(dtype).eval(), preset, quantize, linear)
    return Engine(preset, model, CausalVideoVAE(preset.vae), text,
                  EngineConfig(kv_memory_bytes=kv_memory_bytes, max_frames=None, **engine_kw), dtype=dtype,
                  device=device)


def peak_held_to(dtype: torch.dtype, device: torch.device, peaks: dict[torch.dtype, float]) -> tuple[float, str]:
    """The matmul peak a model in ``dtype`` is held to (MFU's denominator, the real-time guards), and its name.

    Its own dtype's peak (``peaks[dtype]``), except bf16 on a CPU whose bf16 GEMMs are emulated: there PyTorch's
    attention widens bf16 to float32 inside and the norms run in float32, so such a model outruns its own
    GEMMs (an MFU of 106 % against the bf16 peak on an AVX2-only CPU) and is held to the faster of the peaks.
    """
    if device.type == "cpu" and dtype == torch.bfloat16 and not precision.bf16_gemms_native():
        return max(peaks.values()), "float32: bf16 emulated"
    return peaks[dtype], str(dtype).removeprefix("torch.")


def forwards_per_chunk(preset: Preset) -> int:
    """Transformer forwards a chunk costs: its denoising steps and the cache write."""
    return len(preset.sampler.denoising_steps) + 1


def steady_key_frames(preset: Preset) -> int:
    """Frames a steady-state chunk's self-attention reads: the rolling window, which includes the chunk itself
    (``CacheConfig``); an unbounded window grows with the stream, so it is measured at 12 frames."""
    return preset.cache.window_frames or 12


def rtf_ceiling(preset: Preset, peak_flops: float) -> float:
    """The real-time factor of a steady-state chunk's transformer work (the denoising forwards + 1 cache write,
    each attending to the full window, the chunk included) at 100 % of ``peak_flops``: no VAE decode, no
    overhead. No engine beats it on a machine with that peak, so it says which targets a CPU can reach at all.
    """
    chunk = preset.sampler.chunk_frames
    steady = forwards_per_chunk(preset) * transformer_forward_flops(preset.model, preset.tokens_per_frame, chunk,
                                                  steady_key_frames(preset)).total
    return peak_flops * preset.pixel_frames(chunk) / steady / preset.video.fps


def prepare_model(model: CausalWanTransformer, preset: Preset, quantize: str, linear: str) -> CausalWanTransformer:
    return prepare_for_inference(model, quantize=quantize, linear=linear,  # type: ignore[return-value]
                                 rows_hint=preset.chunk_tokens)


def run_streams(engine: Engine, num_streams: int, num_chunks: int) -> dict[str, Any]:
    """Run ``num_streams`` streams of ``num_chunks`` chunks; per-chunk wall times of stream 0."""
    frames_per_chunk = engine.preset.pixel_frames(engine.preset.sampler.chunk_frames)
    t0 = time.perf_counter()
    sids = [engine.add_request(GenerationRequest(PROMPTS[i % 4], seed=i, num_frames=num_chunks * frames_per_chunk))
            for i in range(num_streams)]
    first: float | None = None
    chunk_times: list[float] = []
    generate_ms: list[float] = []
    decode_ms: list[float] = []
    last = t0
    total_frames = 0
    part_ms = [0.0, 0.0]  # a chunk delivered in parts (a stream's first): its forwards and decode so far
    while engine.has_unfinished():
        for out in engine.step():
            total_frames += len(out.frames)
            if out.session_id == sids[0] and len(out.frames):
                now = time.perf_counter()
                first = first if first is not None else now - t0
                part_ms[0] += out.timing.generate_ms
                part_ms[1] += out.timing.decode_ms
                tensors = out.session.tensors  # type: ignore[union-attr]  # None once the session ended
                if tensors is not None and tensors.undecoded is not None:
                    continue  # the first latent frame, out early: its chunk ends with the next part
                chunk_times.append(now - last)
                generate_ms.append(part_ms[0])
                decode_ms.append(part_ms[1])
                part_ms = [0.0, 0.0]
                last = now
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "frames": total_frames, "ttff_s": first, "chunk_s": chunk_times,
            "generate_ms": generate_ms, "decode_ms": decode_ms}


def chunk_breakdown(run: dict[str, Any], skip: int = 5) -> dict[str, Any]:
    """Where a steady-state chunk's wall time goes (medians over the chunks after the first ``skip``):
    its transformer forwards (4 denoising + the cache write, as the runner times them), its streaming VAE
    decode, and the rest (scheduler, cache bookkeeping, frame conversion, Python)."""
    every = list(zip(run["chunk_s"], run["generate_ms"], run["decode_ms"], strict=True))
    chunks = every[skip:] or every
    wall = statistics.median(c for c, _, _ in chunks)
    parts = {"transformer": statistics.median(g / 1000 for _, g, _ in chunks),
             "decode": statistics.median(d / 1000 for _, _, d in chunks)}
    parts["other"] = max(0.0, wall - parts["transformer"] - parts["decode"])
    return {"chunk_s": wall, **{f"{k}_s": v for k, v in parts.items()},
            "share": {k: v / wall for k, v in parts.items()}}


def join_ttff(engine: Engine, running: int = 3, warm_chunks: int = 2) -> float:
    """Seconds from adding a stream to ``engine`` (where ``running`` streams have each delivered
    ``warm_chunks`` chunks) to its first frames."""
    per_chunk = engine.preset.pixel_frames(engine.preset.sampler.chunk_frames)
    for i in range(running):
        engine.add_request(GenerationRequest(PROMPTS[i % 4], seed=i, num_frames=40 * per_chunk))
    while min(s.emitted_pixel_frames for s in engine.sessions.values()) < warm_chunks * per_chunk:
        engine.step()
    t0 = time.perf_counter()
    sid = engine.add_request(GenerationRequest(PROMPTS[3], seed=99, num_frames=4 * per_chunk))
    while True:
        if any(out.session_id == sid and len(out.frames) for out in engine.step()):
            return time.perf_counter() - t0


def first_frames_pair(engines: dict[str, Engine], rounds: int) -> dict[str, float]:
    """Median seconds from adding a fresh stream to its first frames in each engine (the engines alternate, a
    new prompt and seed every round; each stream is stopped once its first frames are out)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, engine in engines.items():
            frames = 40 * engine.preset.pixel_frames(engine.preset.sampler.chunk_frames)
            t0 = time.perf_counter()
            sid = engine.add_request(GenerationRequest(f"{PROMPTS[r % 4]}, take {r}", seed=100 + r, num_frames=frames))
            while not any(out.session_id == sid and len(out.frames) for out in engine.step()):
                pass
            times[name].append(time.perf_counter() - t0)
            engine.abort(sid)
            while engine.has_unfinished():
                engine.step()
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_forward(model: CausalWanTransformer, preset: Preset, num_frames: int, repeats: int,
                 mask: torch.Tensor | None = None, one_token: bool = False) -> float:
    """Median seconds of one forward over ``num_frames`` frames. ``one_token``: frames of a single patch each
    (the same operators and weights, next to no arithmetic), i.e. the forward's fixed cost."""
    dtype, device = model.proj_out.weight.dtype, model.proj_out.weight.device
    ctx = model.encode_text(torch.zeros(1, preset.model.text_max_tokens, preset.model.text_dim, dtype=dtype,
                                        device=device))
    _, ph, pw = preset.model.patch_size
    height, width = (ph, pw) if one_token else (preset.latent_height, preset.latent_width)
    x = torch.randn(1, preset.model.latent_channels, num_frames, height, width, dtype=dtype).to(device)
    t = torch.full((1,), 500.0, device=device)
    mask = None if mask is None else mask.to(device)
    times = []
    with torch.no_grad():
        model(x, t, ctx, attn_mask=mask)
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            model(x, t, ctx, attn_mask=mask)
            synchronize(device)  # CUDA launches return at once: time the finished forward
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--quick", action="store_true", help="fewer chunks (smoke run, noisier)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="as `streamgen serve --dtype`")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="INT8 linear layers (CPU, float32); the other-dtype run stays unquantised")
    parser.add_argument("--hash-text", action="store_true",
                        help="skip MiniLM (hash embeddings of the preset's text width; needed for wan-1.3b's 4096)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="attention backend, as `streamgen serve --attention` (auto: gemm on a CPU with native "
                             "bf16); the JSON counts which paged path its calls took")
    parser.add_argument("--linear", default="auto", choices=LINEAR_KERNELS,
                        help="linear-layer kernel, as `streamgen serve --linear` (auto: onednn on a CPU); with onednn "
                             "the JSON also has the same stream with aten linears, side by side")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="ATen/oneDNN/MKL kernels capped at AVX2 and auto = float32: an AVX2-only CPU's kernels")
    parser.add_argument("--kv-memory-mb", type=float, default=256,
                        help="KV pool per engine (wan-1.3b in bf16: ~288 MiB a latent frame)")
    args = parser.parse_args()
    if args.emulate_avx2:
        emulate_avx2(sys.argv)  # re-executes with the caps set, unless they are
    try:  # before anything loads: a bad --device is one line and exit 2
        device = resolve_device(args.device)
        if args.emulate_avx2 and device.type != "cpu":
            raise ValueError("--emulate-avx2 is a CPU emulation; drop it for --device cuda")
        if args.emulate_avx2 and args.dtype == "auto":
            choice = DtypeChoice(torch.float32, "auto under --emulate-avx2: an AVX2-only CPU has no native bf16")
        else:
            choice = resolve_dtype(args.dtype, device)
        attention, attention_reason = resolve_attention(args.attention, device)
        get_backend(attention)  # an unavailable backend: its own one-line reason
        check_quantize(args.quantize, device, choice.dtype)  # e.g. INT8 of a bf16 model: say what to use
        linear = resolve_linear(args.linear, device, dtype=choice.dtype, quantize=args.quantize)
    except (ValueError, BackendUnavailableError) as exc:
        print(f"benchmarks/engine.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    dtype = choice.dtype
    print(f"device: {device_info(device).describe()}; dtype: {choice.name} ({choice.reason}); "
          f"attention: {attention} ({attention_reason}); linear: {linear.kernel} ({linear.reason})", file=sys.stderr)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    engine_kw: dict[str, Any] = {"device": device, "kv_memory_bytes": int(args.kv_memory_mb * 2**20),
                                 "attention": attention, "linear": linear.kernel}
    hashed = HashTokenEncoder(preset.model.text_dim) if args.hash_text else None
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=hashed)
    if not args.hash_text:
        text.encode(["warm up the text model"])
    long_chunks = 40 if args.quick else 210
    fps = preset.video.fps
    chunk = preset.sampler.chunk_frames
    tokens = preset.tokens_per_frame
    window_frames = steady_key_frames(preset)

    peak = best_matmul_peak_flops(dtype, device, args.quantize)
    other_peak = best_matmul_peak_flops(other, device)
    # A lower bound on the transformer work per pixel frame (4 denoising forwards + 1 cache write, each
    # attending at least to the chunk itself): the real-time factor's guard against impossible timings.
    chunk_flops = forwards_per_chunk(preset) * transformer_forward_flops(preset.model, tokens, chunk, chunk).total
    flops_per_frame = chunk_flops / preset.pixel_frames(chunk)

    # 1. One stream, long, rolling window (the preset's): RTF, TTFF, chunk 10 vs chunk 200.
    single_engine = build(preset, text, dtype, args.quantize, **engine_kw)
    warm_up_s = single_engine.warm_up()  # as `streamgen serve` does before SERVING
    single = run_streams(single_engine, 1, long_chunks)
    usage = single_engine.kv.usage()
    paged_calls = {"direct": usage.paged_direct_calls, "split": usage.paged_split_calls,
                   "gathered": usage.paged_gathered_calls}
    chunk_s = single["chunk_s"]
    # Medians over 11 chunks centred on chunk 10 (the window is full from chunk 4 on) and on chunk 200:
    # single chunk times on a shared 2-core machine jitter by 10 % and more.
    late = min(200, len(chunk_s) - 6)
    win10 = statistics.median(chunk_s[5:16])
    win200 = statistics.median(chunk_s[late - 5:late + 6])
    rtf = realtime_factor(single["frames"], single["wall_s"], fps, flops_per_frame,
                          peak_held_to(dtype, device, {dtype: peak, other: other_peak})[0])
    breakdown = chunk_breakdown(single)

    # 1b. The same stream for a few chunks in the other dtype, side by side.
    # Its linears as auto picks them for that dtype (oneDNN packs bf16 only on AVX512/AVX-NE-CONVERT CPUs).
    other_linear = resolve_linear("aten" if args.linear == "aten" else "auto", device, dtype=other)
    other_run = run_streams(build(preset, text, other, **{**engine_kw, "linear": other_linear.kernel}), 1, 6)
    # Measured again: load drifts on a shared machine.
    other_peak = max(other_peak, best_matmul_peak_flops(other, device))
    other_rtf = realtime_factor(other_run["frames"], other_run["wall_s"], fps, flops_per_frame,
                                peak_held_to(other, device, {dtype: peak, other: other_peak})[0])
    # 1c. With prepacked linears: the same stream with F.linear, a few chunks in the same dtype, side by side.
    aten_rtf = onednn_rtf6 = None
    if linear.kernel == "onednn":
        aten_run = run_streams(build(preset, text, dtype, args.quantize, **{**engine_kw, "linear": "aten"}), 1, 6)
        quick_run = run_streams(build(preset, text, dtype, args.quantize, **engine_kw), 1, 6)
        aten_rtf = realtime_factor(aten_run["frames"], aten_run["wall_s"], fps, flops_per_frame, peak)
        onednn_rtf6 = realtime_factor(quick_run["frames"], quick_run["wall_s"], fps, flops_per_frame, peak)

    # 2. Four streams batched vs one stream, same length, same engine settings.
    n_batch_chunks = 8 if args.quick else 20
    one = run_streams(build(preset, text, dtype, args.quantize, **engine_kw), 1, n_batch_chunks)
    four = run_streams(build(preset, text, dtype, args.quantize, **engine_kw), 4, n_batch_chunks)
    batch_ratio = (four["frames"] / four["wall_s"]) / (one["frames"] / one["wall_s"])

    # 2b. A stream joining three running ones: its first chunk first (the CPU default) vs all batched.
    join = {mode: join_ttff(build(preset, text, dtype, args.quantize, first_chunk_first=flag, **engine_kw))
            for mode, flag in (("first_chunk_first", True), ("batched", False))}

    # 2c. A fresh stream's first frames: its first latent frame early (the default) vs its first chunk whole.
    first_frames = first_frames_pair({"early": build(preset, text, dtype, args.quantize, **engine_kw),
                                      "whole": build(preset, text, dtype, args.quantize, early_first_frames=False,
                                                     **engine_kw)}, rounds=3 if args.quick else 7)

    # 3. Cached chunk vs recomputing a 21-frame visible context (Self-Forcing's comparison).
    window = 21
    p21 = dataclasses.replace(preset, cache=CacheConfig(window_frames=window, sink_frames=0))
    torch.manual_seed(0)
    with device:
        model = CausalWanTransformer(preset.model, attention)
    model = prepare_model(model.to(dtype).eval(), preset, args.quantize, linear.kernel)
    repeats = 3 if args.quick else 7
    # No cache: every denoising forward runs over context + chunk under the block-causal mask.
    mask = block_causal_mask(window, tokens, [window - chunk, chunk])
    recompute_chunk = 4 * time_forward(model, preset, window, repeats, mask)
    cached = run_streams(build(p21, text, dtype, args.quantize, **engine_kw), 1, 14 if args.quick else 20)
    cached_chunk = statistics.median(cached["chunk_s"][8:])  # window full from chunk 7 on
    cached_transformer = statistics.median(cached["generate_ms"][8:]) / 1000
    decode = statistics.median(cached["decode_ms"][8:]) / 1000
    speedup = recompute_chunk / cached_transformer
    pipeline_speedup = (recompute_chunk + decode) / cached_chunk

    # 4. MFU of the transformer forward: 12 frames under full attention, and one 3-frame chunk.
    # Again, just before the timed forwards.
    peak = max(peak, best_matmul_peak_flops(dtype, device, args.quantize))
    held, held_name = peak_held_to(dtype, device, {dtype: peak, other: other_peak})
    if args.quantize == "int8":
        held_name = "int8"
    fwd = time_forward(model, preset, window_frames, repeats)
    flops = transformer_forward_flops(preset.model, tokens, window_frames, window_frames).total
    mfu = utilisation(flops, fwd, held)
    fwd3 = time_forward(model, preset, chunk, repeats)
    fixed3 = time_forward(model, preset, chunk, repeats, one_token=True)
    mfu3 = utilisation(transformer_forward_flops(preset.model, tokens, chunk, chunk).total, fwd3, held)
    fixed_share = min(1.0, fixed3 / fwd3)  # a one-patch forward slower than the real one is timing noise
    ceiling = rtf_ceiling(preset, held)  # the run's best peak, as MFU's

    name = str(dtype).removeprefix("torch.")
    # 5.0 is the target of CPUs with native bf16; one without it is held to the float32 target, forced bf16 or not.
    native_bf16 = device.type == "cpu" and dtype == torch.bfloat16 and precision.bf16_gemms_native()
    rtf_target = 5.0 if native_bf16 else 3.0
    result = {
        "preset": preset.name, "device": device_info(device).describe(), "threads": args.threads, "dtype": name,
        "cpu": cpu_description() if device.type == "cpu" else None,
        "dtype_reason": choice.reason,
        "quantize": args.quantize, "attention": attention, "attention_reason": attention_reason,
        "linear": linear.kernel, "linear_reason": linear.reason,
        "linear_aten": None if aten_rtf is None else {"rtf_6_chunks": aten_rtf, "onednn_rtf_6_chunks": onednn_rtf6},
        "paged_attention_calls": paged_calls,
        "matmul_peak_gflops": peak / 1e9, "mfu_peak": held_name, "mfu_peak_gflops": held / 1e9,
        "rtf": rtf, "rtf_target": rtf_target, "generated_fps": rtf * fps, "ttff_s": single["ttff_s"],
        "ttff_early_s": first_frames["early"], "ttff_whole_s": first_frames["whole"], "warm_up_s": warm_up_s,
        "rtf_ceiling": ceiling, "rtf_of_ceiling": rtf / ceiling,
        "chunk10_s": win10, "chunk200_s": win200, "chunk_index_late": late, "chunk_breakdown": breakdown,
        "latency_ratio_200_10": win200 / win10,
        "other_dtype": {"dtype": str(other).removeprefix("torch."), "matmul_peak_gflops": other_peak / 1e9,
                        "linear": other_linear.kernel,
                        "rtf_6_chunks": other_rtf},
        "batch1_fps": one["frames"] / one["wall_s"], "batch4_fps": four["frames"] / four["wall_s"],
        "batch4_over_1": batch_ratio, "join_ttff_s": join,
        "recompute_chunk_s_21": recompute_chunk, "cached_transformer_chunk_s_21": cached_transformer,
        "cache_speedup_21": speedup, "decode_chunk_s_21": decode, "cached_chunk_wall_s_21": cached_chunk,
        "pipeline_speedup_21": pipeline_speedup,
        "forward_s_12_frames": fwd, "forward_gflop_12_frames": flops / 1e9, "mfu": mfu,
        "forward_s_3_frames": fwd3, "mfu_3_frames": mfu3,
        "forward_s_3_frames_one_token": fixed3, "fixed_share_3_frames": fixed_share,
    }
    print(json.dumps(result, indent=2))
    rows = [(f"real-time factor (1 stream, {name})", f"{rtf:.2f}", f">= {rtf_target:.1f}"),
            ("  ceiling: transformer alone at the peak", f"{ceiling:.2f}", ""),
            (f"  same, {result['other_dtype']['dtype']} (6 chunks)", f"{other_rtf:.2f}", ""),
            *([(f"  6 chunks, {name}: onednn / aten linears", f"{onednn_rtf6:.2f} / {aten_rtf:.2f}", "")]
              if aten_rtf is not None else []),
            ("time to first frame", f"{single['ttff_s']:.3f} s", "<= 0.3 s"),
            ("  fresh streams, median: first frame early / chunk whole",
             f"{first_frames['early']:.3f} / {first_frames['whole']:.3f} s", ""),
            ("chunk: transformer / decode / other", "/".join(f"{100 * breakdown['share'][k]:.0f}" for k in
                                                             ("transformer", "decode", "other")) + " %", ""),
            (f"chunk {late} / chunk 10 latency", f"{win200 / win10:.3f}", "<= 1.05"),
            ("recompute / cached chunk @21", f"{speedup:.2f}x", ">= 3.5x"),
            ("  same, whole chunk with decode", f"{pipeline_speedup:.2f}x", ""),
            ("4 streams / 1 stream fps", f"{batch_ratio:.2f}x", ""),
            ("joining stream ttff, first chunk first", f"{join['first_chunk_first']:.3f} s", "<= 0.3 s"),
            ("  same, batched with the others", f"{join['batched']:.3f} s", ""),
            (f"MFU, 12-frame forward ({held_name} peak)", f"{100 * mfu:.1f} %",
             ">= 50 %"),
            ("MFU, 3-frame chunk forward", f"{100 * mfu3:.1f} %", ""),
            ("  its fixed cost (1 token per frame)", f"{1e3 * fixed3:.1f} ms = {100 * fixed_share:.0f} %", "")]
    print(f"\n{'metric':38} {'measured':>12} {'target':>10}")
    for row_name, value, target in rows:
        print(f"{row_name:38} {value:>12} {target:>10}")


if __name__ == "__main__":
    main()
