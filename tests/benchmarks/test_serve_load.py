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
