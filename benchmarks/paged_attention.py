"""Paged vs contiguous KV cache: per-chunk time, bytes per session, pool utilisation.

    python benchmarks/paged_attention.py                 # default preset, bf16, 2 threads
    python benchmarks/paged_attention.py --quick         # fewer timed chunks
    python benchmarks/paged_attention.py --device cuda --attention flex   # on a GPU, a fused paged kernel

Prints one JSON document, then a short table. What it measures:

* **chunk time**: one streaming chunk as the sampler runs it -- ``len(denoising_steps)``
  non-committing forwards plus one committing forward (and, for the contiguous cache, its
  ``commit``) -- in steady state (the window full, evicting every chunk), through the paged
  cache and through the contiguous reference, at several window sizes (= context lengths),
  for 1 session and for a batch of sessions. Runs alternate between the two caches so
  machine noise hits both alike; medians are reported. Target: paged overhead <= 10 %.
* **bytes per session**: resident bytes in steady state and the worst-case reservation.
* **pool utilisation**: 8 sessions of mixed lengths; the fraction of handed-out pool bytes
  that hold live (resident) tokens. Target >= 95 %. For contrast, the same fraction for a
  cache preallocated per session at its full window (the Self-Forcing layout).
* **page layouts** for the ``wan-1.3b`` geometry (1560-token frames, window 12 incl. 3 sinks,
  chunks of 3, bf16 K/V of 30 layers x 1536), whatever ``--preset`` times: one stream run
  to steady state with whole-frame pages (1560 tokens, the old layout), token-granular pages
  (64 / 256 / 512 tokens, dead tokens masked) and frames padded to 256-token pages; bytes per
  stream held after a commit and at the peak of a forward, the admission reservation, the
  bytes of dead tokens or padding, and which backends read the pages in place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from streamgen.attention import BackendUnavailableError, get_backend
from streamgen.attention.flash import FlashBackend
from streamgen.attention.flex import FlexBackend
from streamgen.attention.xformers import XFormersBackend
from streamgen.cache.block_pool import BlockPool, KVPageSpec
from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.window import worst_case_resident_frames
from streamgen.config import CacheConfig, Preset, get_preset
from streamgen.device import DEVICE_HELP, check_dtype, device_info, resolve_device, synchronize
from streamgen.model.transformer import CausalWanTransformer, TextContext

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Stream:
    """Inputs shared by the paged and the contiguous run, so both do identical math."""

    model: CausalWanTransformer
    preset: Preset
    text: TextContext
    batch: int
    dtype: torch.dtype

    @property
    def chunk(self) -> int:
        return self.preset.sampler.chunk_frames

    @property
    def device(self) -> torch.device:
        return self.model.proj_out.weight.device

    def latents(self) -> torch.Tensor:
        p = self.preset
        return torch.randn(self.batch, p.model.latent_channels, self.chunk, p.latent_height, p.latent_width,
                           dtype=self.dtype).to(self.device)


def build_model(preset: Preset, dtype: torch.dtype, attention: str = "sdpa",
                device: torch.device | str = "cpu") -> CausalWanTransformer:
    with torch.device(device):
        model = CausalWanTransformer(preset.model, attention).eval()
    with torch.no_grad():  # random weights; perturb the zero-initialised head so outputs are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype)


def paged_chunk(s: Stream, manager: PagedKVCacheManager, sids: list[str], num_steps: int) -> None:
    starts = torch.tensor([manager.num_committed_frames(sid) for sid in sids], device=s.device)
    for step in range(num_steps + 1):
        commit = step == num_steps
        t = torch.zeros(s.batch, device=s.device) if commit else torch.full((s.batch,), 900.0, device=s.device)
        with manager.begin_forward(sids, s.chunk, commit=commit) as view:
            s.model(s.latents(), t, s.text, frame_offsets=starts, kv_cache=view)


def contiguous_chunk(s: Stream, cache: ContiguousKVCache, num_steps: int) -> None:
    start = cache.next_frame
    for step in range(num_steps + 1):
        commit = step == num_steps
        t = torch.zeros(s.batch, device=s.device) if commit else torch.full((s.batch,), 900.0, device=s.device)
        view = cache.view(start, s.chunk)
        s.model(s.latents(), t, s.text, frame_offsets=start, kv_cache=view)
        if commit:
            cache.commit(view)


@torch.no_grad()
def time_chunks(s: Stream, cfg: CacheConfig, num_timed: int) -> dict[str, Any]:
    """Median wall time of one steady-state chunk, paged vs contiguous (same inputs, same backend)."""
    preset, backend = s.preset, s.model.backend
    num_steps = len(preset.sampler.denoising_steps)
    worst = worst_case_resident_frames(cfg, s.chunk)
    manager = PagedKVCacheManager.from_preset(preset, backend, num_blocks=1 + s.batch * worst, dtype=s.dtype,
                                              cache_config=cfg, device=s.device)
    sids = [f"s{i}" for i in range(s.batch)]
    for sid in sids:
        assert manager.admit(sid, worst)
    cache = ContiguousKVCache(preset.model.num_layers, preset.tokens_per_frame, cfg, backend)
    # Fill the window (plus one chunk) so every timed chunk evicts: the steady state of a stream.
    for _ in range(-(-(cfg.window_frames or 0) // s.chunk) + 2):
        paged_chunk(s, manager, sids, 0)
        contiguous_chunk(s, cache, 0)
    times: dict[str, list[float]] = {"paged": [], "contiguous": []}
    for i in range(num_timed):
        order = ("paged", "contiguous") if i % 2 == 0 else ("contiguous", "paged")
        for name in order:
            synchronize(s.device)
            t0 = time.perf_counter()
            if name == "paged":
                paged_chunk(s, manager, sids, num_steps)
            else:
                contiguous_chunk(s, cache, num_steps)
            synchronize(s.device)  # CUDA launches return at once: time the finished chunk
            times[name].append(time.perf_counter() - t0)
    paged_ms = 1e3 * statistics.median(times["paged"])
    contiguous_ms = 1e3 * statistics.median(times["contiguous"])
    context_frames = cfg.window_frames or manager.num_committed_frames(sids[0])
    return {
        "window_frames": cfg.window_frames, "sink_frames": cfg.sink_frames, "batch": s.batch,
        "context_tokens": context_frames * preset.tokens_per_frame,
        "forwards_per_chunk": num_steps + 1,
        "paged_ms_per_chunk": round(paged_ms, 2), "contiguous_ms_per_chunk": round(contiguous_ms, 2),
        "paged_overhead_pct": round(100 * (paged_ms / contiguous_ms - 1), 2),
        "paged_calls": {"direct": manager.usage().paged_direct_calls, "split": manager.usage().paged_split_calls,
                        "gathered": manager.usage().paged_gathered_calls},
        "paged_min_ms": round(1e3 * min(times["paged"]), 2),
        "contiguous_min_ms": round(1e3 * min(times["contiguous"]), 2),
    }


def session_bytes(preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    cfg = preset.cache
    manager = PagedKVCacheManager.from_preset(preset, get_backend("sdpa"), num_blocks=2, dtype=dtype)
    worst = manager.worst_case_frames(preset.sampler.chunk_frames)
    steady = cfg.sink_frames + (cfg.recent_frames or 0)
    return {
        "bytes_per_frame": manager.bytes_per_frame,
        "steady_state_frames": steady, "steady_state_bytes": steady * manager.bytes_per_frame,
        "worst_case_frames": worst,
        "reserved_bytes": manager.blocks_for_frames(worst) * manager.pool.bytes_per_block,
    }


@torch.no_grad()
def pool_utilisation(preset: Preset, dtype: torch.dtype, lengths: list[int], block_size_frames: int
                     ) -> dict[str, Any]:
    """Run sessions of the given lengths (writing real K/V pages) and measure how full their pages are."""
    cfg = CacheConfig(preset.cache.window_frames, preset.cache.sink_frames, block_size_frames)
    spec_manager = PagedKVCacheManager.from_preset(preset, get_backend("sdpa"), num_blocks=2, dtype=dtype,
                                                   cache_config=cfg)
    chunk = preset.sampler.chunk_frames
    worst = spec_manager.worst_case_frames(chunk)
    num_blocks = 1 + len(lengths) * spec_manager.blocks_for_frames(worst)
    manager = PagedKVCacheManager.from_preset(preset, get_backend("sdpa"), num_blocks=num_blocks, dtype=dtype,
                                              cache_config=cfg)
    m = preset.model
    for i, length in enumerate(lengths):
        sid = f"s{i}"
        assert manager.admit(sid, worst)
        for _ in range(length // chunk):
            with manager.begin_forward([sid], chunk, commit=True) as view:
                for layer in range(m.num_layers):
                    x = torch.randn(1, chunk * preset.tokens_per_frame, m.num_heads, m.head_dim, dtype=dtype)
                    view.attend(layer, x, x, x)
    usage = manager.usage()
    window_capacity = cfg.sink_frames + (cfg.recent_frames or 0) + chunk  # a fixed per-session buffer
    live_frames = usage.live_token_bytes // manager.bytes_per_frame
    return {
        "block_size_frames": block_size_frames, "session_lengths_frames": lengths,
        "used_bytes": usage.used_bytes, "live_token_bytes": usage.live_token_bytes,
        "utilisation_pct": round(100 * usage.utilisation, 2),
        "pool_in_use_pct": round(100 * usage.usage, 2),
        "preallocated_window_utilisation_pct": round(100 * live_frames / (len(lengths) * window_capacity), 2),
    }


@torch.no_grad()
def page_layout(preset: Preset, dtype: torch.dtype, block_size_tokens: int, pad_frames_to: int | None = None
                ) -> dict[str, Any]:
    """One stream of ``preset``'s geometry run past its window with pages of ``block_size_tokens``.

    Bookkeeping at full size, tensors at 1 layer x 1 head x 1 dim (bytes are scaled by the real
    ``bytes_per_token``). ``pad_frames_to``: each frame's tokens padded to a multiple of this (the
    frame-aligned alternative), padding counted as waste.
    """
    m, cfg, chunk = preset.model, preset.cache, preset.sampler.chunk_frames
    real = KVPageSpec(m.num_layers, m.num_heads, m.head_dim, block_size_tokens, dtype)
    live_tpf = preset.tokens_per_frame
    tpf = live_tpf if pad_frames_to is None else -(-live_tpf // pad_frames_to) * pad_frames_to
    spec = KVPageSpec(1, 1, 1, block_size_tokens)
    worst = worst_case_resident_frames(cfg, chunk)
    probe = PagedKVCacheManager(BlockPool(spec, 2), cfg, tpf, get_backend("sdpa"))
    manager = PagedKVCacheManager(BlockPool(spec, 1 + probe.blocks_for_frames(worst)), cfg, tpf, get_backend("sdpa"))
    assert manager.admit("s", worst)
    peak_pages, masked = 0, False
    for _ in range(2 * -(-(cfg.window_frames or 12) // chunk) + 2):
        with manager.begin_forward(["s"], chunk, commit=True) as view:
            peak_pages = max(peak_pages, len(manager.block_ids("s")))
            masked = view.plan.kv_valid is not None  # steady state: the last forward's plan
            x = torch.zeros(1, chunk * tpf, 1, 1)
            view.attend(0, x, x, x)
    masked = masked or tpf != live_tpf  # padding is a hole inside every frame's pages
    held_pages = len(manager.block_ids("s"))
    live_bytes = len(manager.resident_frames("s")) * live_tpf * real.bytes_per_token
    held_bytes = held_pages * real.bytes_per_block
    cuda = torch.device("cuda")
    paths = {"flash": FlashBackend.paged_layout(block_size_tokens, masked=masked),
             "xformers": XFormersBackend.paged_layout(block_size_tokens, masked=masked),
             "flex (CUDA, compiled)": FlexBackend(compile=True).paged_layout(block_size_tokens, masked=masked,
                                                                            device=cuda)}
    layout = f"{block_size_tokens}-token pages" + ("" if pad_frames_to is None else f", frames padded to {tpf}")
    return {
        "layout": layout, "block_size_tokens": block_size_tokens, "tokens_per_frame": live_tpf,
        "padded_tokens_per_frame": tpf, "bytes_per_page": real.bytes_per_block,
        "steady_state_pages": held_pages, "steady_state_bytes": held_bytes, "live_bytes": live_bytes,
        "waste_bytes": held_bytes - live_bytes, "waste_pct": round(100 * (held_bytes - live_bytes) / held_bytes, 2),
        "peak_bytes": peak_pages * real.bytes_per_block,
        "reserved_bytes": manager.blocks_for_frames(worst) * real.bytes_per_block,
        "steady_state_needs_token_mask": masked, "paged_paths": paths,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--windows", type=int, nargs="+", default=[6, 12, 24, 48],
                        help="window_frames values (context lengths in latent frames); sinks from the preset")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--timed-chunks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 timed chunks, windows 12 and 48, batch 1")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--attention", default="sdpa", help="backend both caches attend with (sdpa, flex, xformers, "
                                                           "flash); the paged cache counts its calls by path")
    args = parser.parse_args(argv)
    try:  # one line and exit 2 for a bad device, dtype or backend, before anything is built
        device = resolve_device(args.device)
        check_dtype(DTYPES[args.dtype], device)
        get_backend(args.attention)
    except (ValueError, BackendUnavailableError) as exc:
        parser.exit(2, f"benchmarks/paged_attention.py: error: {exc}\n")
    if args.quick:
        args.windows, args.batches, args.timed_chunks = [12, 48], [1], 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset, dtype = get_preset(args.preset), DTYPES[args.dtype]
    model = build_model(preset, dtype, args.attention, device)
    sinks = preset.cache.sink_frames
    rows = []
    for batch in args.batches:
        text = model.encode_text(torch.randn(batch, preset.model.text_max_tokens, preset.model.text_dim,
                                             dtype=dtype).to(device))
        stream = Stream(model, preset, text, batch, dtype)
        for window in args.windows:
            cfg = CacheConfig(window_frames=window, sink_frames=min(sinks, window - preset.sampler.chunk_frames))
            rows.append(time_chunks(stream, cfg, args.timed_chunks))
    lengths = [3, 6, 9, 15, 24, 60, 150, 600]  # frames: from a fresh session to a ~2.5 min stream
    report = {
        "preset": args.preset, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
        "device": device_info(device).describe(), "attention": args.attention,
        "tokens_per_frame": preset.tokens_per_frame, "chunk_frames": preset.sampler.chunk_frames,
        "chunk_time": rows,
        "bytes_per_session": session_bytes(preset, dtype),
        "pool_utilisation": [pool_utilisation(preset, dtype, lengths, bsf) for bsf in (1, 2)],
        "wan_1_3b_page_layouts": wan_page_layouts(dtype),
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"{'batch':>5} {'window':>6} {'ctx tok':>7} {'paged ms':>9} {'contig ms':>9} {'overhead':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['window_frames']:>6} {r['context_tokens']:>7} {r['paged_ms_per_chunk']:>9.1f} "
              f"{r['contiguous_ms_per_chunk']:>9.1f} {r['paged_overhead_pct']:>8.1f}%")
    b = report["bytes_per_session"]
    print(f"bytes/session: {b['steady_state_bytes'] / 2**20:.2f} MiB resident ({b['steady_state_frames']} frames), "
          f"{b['reserved_bytes'] / 2**20:.2f} MiB reserved (worst case {b['worst_case_frames']} frames)")
    for u in report["pool_utilisation"]:
        print(f"pool utilisation, 8 sessions, {u['block_size_frames']} frame(s)/page: {u['utilisation_pct']:.1f}% of "
              f"allocated bytes live (preallocated windows: {u['preallocated_window_utilisation_pct']:.1f}%)")
    print()
    print(f"wan-1.3b geometry ({args.dtype} K/V), one stream in steady state:")
    print(f"{'layout':<40} {'held MiB':>9} {'live MiB':>9} {'waste MiB':>9} {'waste':>6} {'peak MiB':>9} "
          f"{'resv MiB':>9}  read in place by")
    for r in report["wan_1_3b_page_layouts"]:
        direct = [name + (" (split: partial pages gathered)" if path == "split" else "")
                  for name, path in r["paged_paths"].items() if path in ("direct", "split")] or ["none (all gather)"]
        print(f"{r['layout']:<40} {r['steady_state_bytes'] / 2**20:>9.1f} {r['live_bytes'] / 2**20:>9.1f} "
              f"{r['waste_bytes'] / 2**20:>9.1f} {r['waste_pct']:>5.1f}% {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['reserved_bytes'] / 2**20:>9.1f}  {', '.join(direct)}")
    return report


def wan_page_layouts(dtype: torch.dtype) -> list[dict[str, Any]]:
    """:func:`page_layout` for the wan-1.3b geometry: the old frame pages, token pages, padded frames."""
    wan = get_preset("wan-1.3b")
    return [page_layout(wan, dtype, wan.tokens_per_frame), page_layout(wan, dtype, 64),
            page_layout(wan, dtype, 256), page_layout(wan, dtype, 512),
            page_layout(wan, dtype, 256, pad_frames_to=256)]


if __name__ == "__main__":
    main()
