"""Per-chunk engine time and time to first frame of two source trees, alternated in one run: is a change slower?

    git worktree add /tmp/before <rev>
    python benchmarks/compare_trees.py --old /tmp/before --new . --rounds 3

Each measurement is a fresh process that imports ``streamgen`` from the tree given and times one
stream of ``--chunks`` chunks with that tree's own ``benchmarks/engine.py`` (``build`` and
``run_streams``: default preset, random weights, ``--dtype`` (float32 by default; ``bfloat16``
for the bf16 path of a CPU with AVX512-BF16/AMX), the hash prompt encoder, ``--threads`` threads);
the median chunk time skips the first five chunks (warm-up, the window filling). The trees
alternate (old, new, old, new, ...) so load from other jobs hits both alike. Printed as one JSON
document and a short table: per round both medians and the new/old ratio, and the median ratio.
A ratio is a comparison on this machine only; the CPU model and its bf16/AMX flags are printed
with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from streamgen.precision import cpu_bf16_flags

_CHILD = r"""
import importlib.util, json, statistics, sys
tree, threads, chunks, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import streamgen
assert streamgen.__file__.startswith(tree), f"streamgen imported from {streamgen.__file__}, not {tree}"
spec = importlib.util.spec_from_file_location("tree_engine_benchmark", f"{tree}/benchmarks/engine.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
from streamgen.config import get_preset
from streamgen.model.text import HashTokenEncoder, TextEncoder
preset = get_preset("default")
text = TextEncoder(preset.model.text_max_tokens, token_encoder=HashTokenEncoder(preset.model.text_dim))
result = bench.run_streams(bench.build(preset, text, getattr(torch, dtype)), 1, chunks)
print(json.dumps({"chunk_s_median": statistics.median(result["chunk_s"][5:]), "ttff_s": result["ttff_s"]}))
"""


# Kernel-ISA caps of the three CPU kernel libraries torch uses (ATen's own loops, oneDNN, MKL): set together, an
# AVX512 machine runs the kernels an AVX2-only CPU runs (``--emulate-avx2`` of engine.py / serve_load.py).
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_description() -> str:
    """The CPU model, its native-bf16 flags (:func:`streamgen.precision.cpu_bf16_flags`) and any kernel-ISA cap
    in the environment (so an emulated AVX2 figure never reads as the machine's own)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = cpu_bf16_flags()
    bf16 = "bf16 flags unreadable" if flags is None else ", ".join(flags) or "no avx512_bf16/amx_bf16"
    caps = [f"{k}={os.environ[k]}" for k in (*AVX2_CAPS, "DNNL_MAX_CPU_ISA") if os.environ.get(k)]
    return f"{model} ({bf16})" + (f"; kernels capped: {' '.join(caps)}" if caps else "")


def emulate_avx2(argv: list[str]) -> None:
    """Re-run this script with :data:`AVX2_CAPS` set (they must be set before torch starts its kernels); returns
    only when they already are."""
    if all(os.environ.get(k) == v for k, v in AVX2_CAPS.items()):
        return
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **AVX2_CAPS})


def measure(tree: Path, threads: int, chunks: int, dtype: str = "float32") -> tuple[float, float]:
    """(median chunk seconds, seconds to the first frames) of one stream run with ``tree``'s code."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tree.resolve()), str(threads), str(chunks), dtype],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"compare_trees: error: the run in {tree} failed: {proc.stderr.strip()[-1500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["chunk_s_median"]), float(out["ttff_s"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--old", type=Path, required=True, help="source tree before the change")
    p.add_argument("--new", type=Path, required=True, help="source tree after the change")
    p.add_argument("--rounds", type=int, default=3, help="old/new pairs (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=40, help="chunks per stream, >= 6 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model dtype of both runs (default: %(default)s; bfloat16 is fast only with native CPU bf16)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.chunks < 6 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1 and --chunks >= 6")
    for tree in (args.old, args.new):
        if not (tree / "benchmarks" / "engine.py").is_file() or not (tree / "streamgen").is_dir():
            p.error(f"{tree} is not a streamgen source tree (no streamgen/ and benchmarks/engine.py)")
    rounds = []
    for _ in range(args.rounds):
        (old, old_ttff), (new, new_ttff) = (measure(args.old, args.threads, args.chunks, args.dtype),
                                            measure(args.new, args.threads, args.chunks, args.dtype))
        rounds.append({"old_chunk_s": old, "new_chunk_s": new, "new_over_old": new / old,
                       "old_ttff_s": old_ttff, "new_ttff_s": new_ttff, "ttff_new_over_old": new_ttff / old_ttff})
    report = {"cpu": cpu_description(), "threads": args.threads, "chunks": args.chunks, "dtype": args.dtype,
              "rounds": rounds,
              "median_new_over_old": statistics.median(r["new_over_old"] for r in rounds),
              "median_ttff_new_over_old": statistics.median(r["ttff_new_over_old"] for r in rounds)}
    print(json.dumps(report, indent=2))
    print(f"\n{report['cpu']}, {args.threads} thread(s), median chunk time of one stream "
          f"(default preset, {args.dtype})")
    print(f"{'round':>5} {'old s':>8} {'new s':>8} {'new/old':>8} {'old ttff':>9} {'new ttff':>9} {'new/old':>8}")
    for i, r in enumerate(rounds, 1):
        print(f"{i:>5} {r['old_chunk_s']:>8.3f} {r['new_chunk_s']:>8.3f} {r['new_over_old']:>8.2f} "
              f"{r['old_ttff_s']:>9.3f} {r['new_ttff_s']:>9.3f} {r['ttff_new_over_old']:>8.2f}")
    print(f"median new/old: chunk {report['median_new_over_old']:.2f}, time to first frame "
          f"{report['median_ttff_new_over_old']:.2f}")
    return report


if __name__ == "__main__":
    main()
