"""benchmarks/engine.py's chunk breakdown: where a steady-state chunk's wall time goes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine.py"


def _engine_benchmark():  # a script beside the benchmarks, not a package
    spec = importlib.util.spec_from_file_location("bench_engine_breakdown", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_breakdown_uses_steady_state_medians_and_the_rest_is_other() -> None:
    bench = _engine_benchmark()
    # Five warm-up chunks (slow, skipped), then chunks of 0.40 s: 250 ms transformer, 100 ms decode.
    run = {"chunk_s": [2.0] * 5 + [0.40, 0.41, 0.39],
           "generate_ms": [1500.0] * 5 + [250.0, 260.0, 240.0],
           "decode_ms": [400.0] * 5 + [100.0, 100.0, 100.0]}
    out = bench.chunk_breakdown(run)
    assert out["chunk_s"] == pytest.approx(0.40)
    assert out["transformer_s"] == pytest.approx(0.25) and out["decode_s"] == pytest.approx(0.10)
    assert out["other_s"] == pytest.approx(0.05)
    assert out["share"] == pytest.approx({"transformer": 0.625, "decode": 0.25, "other": 0.125})
    # Timed parts longer than the wall (clock granularity): "other" is 0, never negative.
    assert bench.chunk_breakdown({"chunk_s": [0.3], "generate_ms": [250.0], "decode_ms": [100.0]})["other_s"] == 0.0


def test_int8_of_a_bf16_model_exits_2_naming_what_to_use() -> None:
    """--quantize int8 quantises float32 weights: with bf16 forced the script says so in one line, before it
    builds anything, instead of a traceback from inside the peak measurement."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--hash-text", "--dtype", "bfloat16",
                           "--quantize", "int8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "benchmarks/engine.py: error: --quantize int8 needs the float32 model" in proc.stderr
    assert "use --dtype float32" in proc.stderr and "Traceback" not in proc.stderr


def test_prepacked_linears_with_int8_exit_2_naming_what_to_use() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--hash-text", "--dtype", "float32",
                           "--quantize", "int8", "--linear", "onednn"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--linear onednn cannot run here: --quantize int8 replaces the linear layers" in proc.stderr
    assert "use --linear aten" in proc.stderr


def test_avx2_emulation_is_named_in_every_cpu_description(monkeypatch: pytest.MonkeyPatch) -> None:
    """--emulate-avx2 figures must never read as the machine's own: the caps show in the CPU description, and
    with them already set the re-exec is a no-op."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import compare_trees

    for key in (*compare_trees.AVX2_CAPS, "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(key, raising=False)
    assert "kernels capped" not in compare_trees.cpu_description()
    for key, value in compare_trees.AVX2_CAPS.items():
        monkeypatch.setenv(key, value)
    described = compare_trees.cpu_description()
    assert described.endswith("kernels capped: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                              "MKL_ENABLE_INSTRUCTIONS=AVX2")
    compare_trees.emulate_avx2(["never-run.py"])  # caps set: returns instead of re-executing


def test_the_ceiling_is_the_steady_chunk_at_the_peak() -> None:
    """A peak that does a steady-state chunk's transformer FLOPs in exactly the chunk's playback time gives a
    ceiling of 1.0. The chunk's keys are counted by the cache policy itself (its visible cached frames far into
    a stream, plus the chunk: 3 sinks + 6 recent + 3 own on the default preset), not by the benchmark's formula."""
    import dataclasses

    from streamgen.cache.window import visible_cached_frames
    from streamgen.config import CacheConfig, get_preset
    from streamgen.perf import transformer_forward_flops

    bench = _engine_benchmark()
    preset = get_preset("default")
    chunk = preset.sampler.chunk_frames
    start = 20 * chunk  # the window long full
    keys = len(visible_cached_frames(preset.cache, start, start, start + chunk)) + chunk
    assert keys == 12 and bench.steady_key_frames(preset) == keys
    forwards = 5 * transformer_forward_flops(preset.model, preset.tokens_per_frame, chunk, keys).total  # 4 + 1
    playback_s = chunk * preset.vae.temporal_factor / preset.video.fps
    assert bench.rtf_ceiling(preset, forwards / playback_s) == pytest.approx(1.0)
    assert bench.rtf_ceiling(preset, 3 * forwards / playback_s) == pytest.approx(3.0)
    short = dataclasses.replace(preset, cache=CacheConfig(window_frames=3, sink_frames=0))
    assert bench.rtf_ceiling(short, forwards / playback_s) > 1.0


def test_the_fixed_cost_forward_has_one_token_per_frame(test_preset, tiny_model) -> None:
    """``time_forward(one_token=True)`` runs the same blocks on frames of a single patch: the forward's fixed
    cost. The patch embedding sees 1 token per frame there and the preset's full grid otherwise."""
    bench = _engine_benchmark()
    model = tiny_model(test_preset.model).eval()
    tokens: list[int] = []
    hook = model.patch_embedding.register_forward_hook(
        lambda _m, _i, out: tokens.append(out.shape[-2] * out.shape[-1]))
    try:
        assert bench.time_forward(model, test_preset, 2, repeats=1, one_token=True) > 0
        assert set(tokens) == {1}
        tokens.clear()
        bench.time_forward(model, test_preset, 2, repeats=1)
        assert set(tokens) == {test_preset.tokens_per_frame} and test_preset.tokens_per_frame > 1
    finally:
        hook.remove()


def test_a_bf16_model_on_emulated_bf16_is_held_to_the_faster_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AVX2-only CPU a forced-bf16 model read an MFU of 106 % against its emulated bf16 GEMM peak (its
    attention and norms run in float32): it is held to the faster peak there, and only there."""
    import torch

    from streamgen import precision

    bench = _engine_benchmark()
    cpu, peaks = torch.device("cpu"), {torch.float32: 150e9, torch.bfloat16: 15e9}
    monkeypatch.setattr(precision, "bf16_gemms_native", lambda: False)
    assert bench.peak_held_to(torch.bfloat16, cpu, peaks) == (150e9, "float32: bf16 emulated")
    assert bench.peak_held_to(torch.float32, cpu, peaks) == (150e9, "float32")
    assert bench.peak_held_to(torch.bfloat16, torch.device("cuda"), peaks) == (15e9, "bfloat16")  # no CPU flags
    monkeypatch.setattr(precision, "bf16_gemms_native", lambda: True)
    native = {torch.float32: 200e9, torch.bfloat16: 800e9}
    assert bench.peak_held_to(torch.bfloat16, cpu, native) == (800e9, "bfloat16")
    assert bench.peak_held_to(torch.float32, cpu, native) == (200e9, "float32")  # never the other dtype's


def test_a_first_chunk_in_two_parts_counts_as_one_chunk(test_preset) -> None:
    """The engine delivers a stream's first latent frame early; ``run_streams`` still times whole chunks (one
    entry per chunk, its forwards and decodes summed), and ``first_frames_pair`` leaves its engines empty."""
    import torch

    from streamgen.model.text import HashTokenEncoder, TextEncoder

    bench = _engine_benchmark()
    text = TextEncoder(test_preset.model.text_max_tokens, token_encoder=HashTokenEncoder(test_preset.model.text_dim))
    engine = bench.build(test_preset, text, torch.float32, kv_memory_bytes=2**22)
    run = bench.run_streams(engine, 1, 3)
    assert run["frames"] == 3 * test_preset.pixel_frames(test_preset.sampler.chunk_frames)
    assert len(run["chunk_s"]) == len(run["generate_ms"]) == len(run["decode_ms"]) == 3
    assert 0 < run["ttff_s"] < run["chunk_s"][0]  # the first frames came out before the first chunk ended
    assert all(ms > 0 for ms in run["generate_ms"] + run["decode_ms"])
    engines = {"early": engine, "whole": bench.build(test_preset, text, torch.float32, kv_memory_bytes=2**22,
                                                     early_first_frames=False)}
    medians = bench.first_frames_pair(engines, rounds=2)
    assert set(medians) == {"early", "whole"} and all(v > 0 for v in medians.values())
    assert all(not e.has_unfinished() and e.kv.usage().num_used_blocks == 0 for e in engines.values())
