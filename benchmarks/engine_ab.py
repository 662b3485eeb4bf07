"""Two engine configurations side by side: chunk time over alternated rounds, and whether they separate.

    python benchmarks/engine_ab.py --a linear=onednn --b linear=aten             # prepacked against F.linear
    python benchmarks/engine_ab.py --a quantize=int8,linear=aten --b linear=onednn --rounds 8
    python benchmarks/engine_ab.py --a attention=sdpa --b attention=gemm --dtype bfloat16 --streams 1 4

A configuration is a comma-separated list of ``key=value`` (keys: ``attention``, ``linear``, ``quantize``;
values as the ``streamgen serve`` flags of the same names, ``auto`` resolved as serving resolves it). Two
engines with the same random weights (``benchmarks/engine.py``'s ``build``), one per configuration, each
run ``--streams`` batched streams; after a warm-up that fills the rolling window, ``--rounds`` rounds of
``--chunks`` chunks, the configurations' order alternating, so that load from other jobs and a machine's
drifting speed hit both alike. Reports per round ``a / b`` of the time per chunk (above 1: ``b`` faster),
the median, and a verdict: a configuration is called faster only when it won every one of at least
:data:`MIN_ROUNDS` rounds (a sign test: all of 6 rounds one way happens by chance with probability 1/32),
otherwise "not separable". Prints one JSON document, then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trees import cpu_description  # noqa: E402
from engine import PROMPTS, build  # noqa: E402

from streamgen.attention import BackendUnavailableError, get_backend, resolve_attention  # noqa: E402
from streamgen.config import ATTENTION_CHOICES, get_preset  # noqa: E402
from streamgen.engine.request import GenerationRequest  # noqa: E402
from streamgen.model.prepack import LINEAR_KERNELS, resolve_linear  # noqa: E402
from streamgen.model.quantize import QUANTIZE_MODES, check_quantize  # noqa: E402
from streamgen.model.text import HashTokenEncoder, TextEncoder  # noqa: E402

CHOICES = {"attention": ATTENTION_CHOICES, "linear": LINEAR_KERNELS, "quantize": QUANTIZE_MODES}
DEFAULTS = {"attention": "auto", "linear": "auto", "quantize": "none"}
MIN_ROUNDS = 6


def parse_config(text: str) -> dict[str, str]:
    """``"quantize=int8,linear=aten"`` -> every key with its value (unnamed keys at serving's defaults)."""
    config = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in CHOICES:
            raise ValueError(f"{part!r}: expected key=value with key one of {', '.join(CHOICES)}")
        if value not in CHOICES[key]:
            raise ValueError(f"{key}={value!r}: choose one of {', '.join(CHOICES[key])}")
        config[key] = value
    return config


def resolve_config(config: dict[str, str], dtype: torch.dtype) -> dict[str, str]:
    """The kernels serving would build on this CPU for ``config`` (``ValueError`` where one cannot run)."""
    check_quantize(config["quantize"], "cpu", dtype)
    linear = resolve_linear(config["linear"], "cpu", dtype=dtype, quantize=config["quantize"])
    attention = resolve_attention(config["attention"], "cpu")[0]
    try:
        get_backend(attention)  # flex / xformers / flash where they cannot run: their own one-line reason
    except BackendUnavailableError as exc:
        raise ValueError(f"attention={attention}: {exc}") from exc
    return {"attention": attention, "linear": linear.kernel, "quantize": config["quantize"]}


def chunk_times(preset_name: str, dtype: torch.dtype, configs: dict[str, dict[str, str]], streams: int,
                rounds: int, chunks: int) -> dict[str, list[float]]:
    """Per configuration (resolved, as :func:`resolve_config` gives), the seconds per chunk (per stream) of each
    round; the configurations alternate their order from round to round."""
    preset = get_preset(preset_name)
    text = TextEncoder(preset.model.text_max_tokens, token_encoder=HashTokenEncoder(preset.model.text_dim))
    frames_per_chunk = preset.pixel_frames(preset.sampler.chunk_frames)
    total = (6 + rounds * chunks + 2) * frames_per_chunk
    engines = {}
    for name, cfg in configs.items():
        engines[name] = build(preset, text, dtype, cfg["quantize"], attention=cfg["attention"], linear=cfg["linear"])
        for i in range(streams):
            engines[name].add_request(GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=i, num_frames=total))

    def run(name: str, n: int) -> float:  # n chunks of every stream; seconds per chunk of one stream
        t0, done = time.perf_counter(), 0
        while done < n * streams:
            done += sum(1 for out in engines[name].step() if len(out.frames))
        return (time.perf_counter() - t0) / n

    names = list(configs)
    for name in names:
        run(name, 6)  # the rolling window full
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(name, chunks))
    return times


def verdict(ratios: list[float], a: str = "a", b: str = "b") -> str:
    """``"<b> faster"`` / ``"<a> faster"`` when every one of >= :data:`MIN_ROUNDS` rounds agrees, else not."""
    if len(ratios) >= MIN_ROUNDS and all(r > 1 for r in ratios):
        return f"{b} faster"
    if len(ratios) >= MIN_ROUNDS and all(r < 1 for r in ratios):
        return f"{a} faster"
    return "not separable"


def summarise(times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """Medians, per-round ``a / b`` ratios and the verdict of :func:`chunk_times`' rounds."""
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    return {"chunk_s": {k: statistics.median(v) for k, v in times.items()}, "a_over_b_per_round": ratios,
            "a_over_b_median": statistics.median(ratios), "rounds_b_faster": sum(r > 1 for r in ratios),
            "verdict": verdict(ratios, a, b)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="configuration a, e.g. quantize=int8,linear=aten")
    p.add_argument("--b", required=True, help="configuration b, e.g. linear=onednn")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--preset", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, nargs="+", default=[1], help="batched streams per engine")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS + 2)
    p.add_argument("--chunks", type=int, default=6, help="chunks per round")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.chunks < 1 or args.threads < 1 or min(args.streams) < 1:
        p.error("--rounds, --chunks, --threads and --streams must be >= 1")
    dtype = getattr(torch, args.dtype)
    try:
        configs = {"a": resolve_config(parse_config(args.a), dtype), "b": resolve_config(parse_config(args.b), dtype)}
    except ValueError as exc:
        p.error(str(exc))
    if configs["a"] == configs["b"]:
        p.error(f"--a and --b resolve to the same kernels here ({configs['a']}): nothing to compare")
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"cpu": cpu_description(), "threads": args.threads, "dtype": args.dtype,
                              "preset": args.preset, "a": configs["a"], "b": configs["b"], "speed": {}}
    for n in args.streams:
        result["speed"][str(n)] = summarise(chunk_times(args.preset, dtype, configs, n, args.rounds, args.chunks),
                                            "a", "b")
    print(json.dumps(result, indent=2))
    print(f"\n{result['cpu']}, {args.threads} threads, {args.dtype}\n  a = {configs['a']}\n  b = {configs['b']}")
    for n, r in result["speed"].items():
        print(f"  {n} stream(s): a/b chunk time median {r['a_over_b_median']:.3f} (rounds "
              f"{min(r['a_over_b_per_round']):.3f}-{max(r['a_over_b_per_round']):.3f}; b faster in "
              f"{r['rounds_b_faster']} of {len(r['a_over_b_per_round'])}): {r['verdict']}")
    return result


if __name__ == "__main__":
    main()
