"""``/metrics`` carries the standard ``process_*`` series besides streamgen's own (a private registry
would otherwise lack them), and two servers in one process do not clash over them."""

from __future__ import annotations

import os
import re
import urllib.request

import pytest

from streamgen.server.metrics import EngineSnapshot, Metrics


def _scrape(metrics: Metrics) -> dict[str, float]:
    port = metrics.serve_http("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop_http()
    return {name: float(value) for name, value in re.findall(r"^([a-z_:]+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="prometheus_client's ProcessCollector reads /proc")
def test_metrics_page_has_the_standard_process_series() -> None:
    first, second = Metrics(), Metrics()  # each its own registry: registering the collectors twice must not clash
    values = _scrape(first)
    assert values["process_resident_memory_bytes"] > 1e6  # this interpreter, torch-free, still holds megabytes
    assert values["process_open_fds"] >= 3
    assert values["process_cpu_seconds_total"] > 0
    assert values["process_start_time_seconds"] > 1e9
    assert values["python_info"] == 1
    assert "python_gc_objects_collected_total" in values
    assert "streamgen:frames_generated_total" in values
    assert _scrape(second)["process_open_fds"] >= 3


def test_paged_attention_calls_are_exported_by_path() -> None:
    """The engine's cumulative direct/gathered counts become one counter with a ``path`` label."""
    metrics = Metrics()

    def calls() -> dict[str, float]:
        port = metrics.serve_http("127.0.0.1", 0)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            metrics.stop_http()
        return {path: float(value) for path, value in
                re.findall(r'^streamgen:paged_attention_calls_total\{path="(\w+)"\} (\S+)$', text, re.MULTILINE)}

    assert calls() == {"direct": 0, "gathered": 0, "split": 0}
    metrics.observe_engine(EngineSnapshot(1, 0, 0.5, 10, 20, paged_direct_calls=30, paged_gathered_calls=4))
    metrics.observe_engine(EngineSnapshot(1, 0, 0.5, 10, 20, paged_direct_calls=90, paged_gathered_calls=4,
                                          paged_split_calls=7))
    assert calls() == {"direct": 90, "gathered": 4, "split": 7}
