"""benchmarks/profile_chunk.py: every profiled operator lands in one group, and the shares add up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_chunk  # noqa: E402

from streamgen.attention import resolve_attention  # noqa: E402


@pytest.mark.parametrize(("op", "group"), [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::bmm", "attention"),
    ("aten::_softmax", "attention"), ("aten::addmm", "gemm"), ("quantized::linear_dynamic", "gemm"),
    ("aten::mkldnn_convolution", "convolution"), ("aten::native_layer_norm", "normalisation"),
    ("aten::index_copy_", "cache"), ("aten::copy_", "cast_copy"), ("aten::gelu", "elementwise"),
    ("aten::view", "other"),
])
def test_operators_fall_in_their_group(op: str, group: str) -> None:
    assert profile_chunk.group_of(op) == group


def test_a_profile_of_the_test_preset_accounts_for_all_its_time(capsys: pytest.CaptureFixture[str]) -> None:
    result = profile_chunk.main(["--preset", "test", "--threads", "1", "--warmup", "2", "--chunks", "2",
                                 "--dtype", "float32", "--top", "5"])
    shares = result["groups_share"]
    assert isinstance(shares, dict)
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert shares["gemm"] > 0 and shares["attention"] > 0 and shares["convolution"] > 0  # transformer and VAE
    assert len(result["top_ops"]) == 5
    assert result["attention"] == resolve_attention("auto", "cpu")[0]  # gemm with native bf16, else sdpa
    assert "ms per chunk (profiled)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_chunk.main(["--chunks", "0"])


def test_streams_are_profiled_batched() -> None:
    """Two streams started together share their forwards: a round of both streams' chunks makes as many
    linear-layer calls as one stream's chunk (two separate streams would make twice as many)."""
    def addmm_calls(streams: int) -> float:
        result = profile_chunk.main(["--preset", "test", "--threads", "1", "--warmup", "1", "--chunks", "2",
                                     "--dtype", "float32", "--top", "40", "--streams", str(streams)])
        assert result["streams"] == streams
        return next(r["calls_per_chunk"] for r in result["top_ops"] if r["op"] == "aten::addmm")

    assert addmm_calls(2) == addmm_calls(1)
