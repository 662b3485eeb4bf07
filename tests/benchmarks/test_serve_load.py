"""benchmarks/serve_load.py, shortened: it starts ``streamgen serve``, runs concurrent streams on loopback,
drains the server and reports errors and memory. The full-length figures are in docs/serving.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_short_load_run_has_no_errors_and_no_memory_growth() -> None:
    res = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--clients", "2", "--duration-s", "2",
                          "--warmup-s", "0", "--preset", "test", "--dtype", "float32", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.split("\n\n", 1)[0])  # the JSON document, then the table
    assert report["errors"] == [] and report["server_exit_code"] == 0
    assert report["rss_ok"] is True and report["rss_mib"]["after"] > 0
    assert len(report["fps"]["per_stream"]) == 2 and report["frames"] >= 2 * 24  # each stream got >= 1.5 s of video
    fps = report["fps"]["per_stream"]
    median = sorted(fps)[0] / 2 + sorted(fps)[1] / 2
    assert abs(report["fps_spread"] - (max(fps) - min(fps)) / median) < 0.01  # per-stream fps are rounded
    assert report["fair"] is (report["fps_spread"] <= 0.10)
    assert 0 < report["ttff_s"]["p50"] <= report["ttff_s"]["p95"] < 5
    assert report["linear"] == "auto" and "kernels capped" not in report["cpu"]
    assert report["server_linear"]["kernel"] == "onednn"  # the server's own start-up choice, from its log


def test_avx2_emulation_reaches_the_server_and_is_named() -> None:
    """--emulate-avx2: the server it starts runs under the AVX2 caps -- shown by the server's own choice: with bf16
    forced, oneDNN capped at AVX2 cannot pack bf16 weights, so its linears stay aten -- and the report names the
    caps; with a server it did not start the flag is refused."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        import pytest

        pytest.skip("AVX2 caps are an x86 emulation")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--clients", "1", "--duration-s", "1",
                          "--warmup-s", "0", "--preset", "test", "--threads", "1", "--emulate-avx2",
                          "--dtype", "bfloat16"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.split("\n\n", 1)[0])
    assert report["errors"] == [] and report["server_exit_code"] == 0 and report["frames"] > 0
    assert report["dtype"] == "bfloat16"
    assert report["server_linear"]["kernel"] == "aten"
    assert report["server_linear"]["reason"].startswith("auto: oneDNN cannot pack bfloat16 weights on this CPU")
    assert report["cpu"].endswith("(server: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                                  "MKL_ENABLE_INSTRUCTIONS=AVX2)")
    refused = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--emulate-avx2", "--server", "127.0.0.1:1"],
                             cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "--emulate-avx2 applies to the server this script starts" in refused.stderr
