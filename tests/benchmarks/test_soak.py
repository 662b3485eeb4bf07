"""benchmarks/soak.py, shortened to seconds: the mixed client load (lengths, cancels, stops, switches,
images, invalid requests) runs against ``streamgen serve`` and reports no anomaly. The 3- and
30-minute figures are in docs/serving.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_short_soak_reports_samples_and_no_anomaly() -> None:
    res = subprocess.run([sys.executable, "benchmarks/soak.py", "--minutes", "0.1", "--clients", "3",
                          "--sample-s", "3", "--warmup-s", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(res.stdout.split("\n\n", 1)[0])  # the JSON document, then the table
    assert report["anomaly_count"] == 0, report["anomalies"]
    assert res.returncode == 0 and report["server_exit_code"] == 0
    assert len(report["samples"]) >= 2 and all(s["rss_mib"] > 0 and s["fds"] > 0 for s in report["samples"])
    final = report["samples"][-1]
    assert final["kv_used_bytes"] == 0 and final["running"] == 0 and final["streams"] == 0
    assert report["calls_total"] >= 5 and report["frames_received"] > 0
    assert "| t (s) | RSS MiB |" in res.stdout
