"""benchmarks/attention_ab.py: one round per backend on the test preset, and its argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_ab  # noqa: E402


def test_alternated_rounds_give_a_ratio_per_round() -> None:
    result = attention_ab.main(["--preset", "test", "--threads", "1", "--streams", "1", "2", "--rounds", "2",
                                "--chunks", "1", "--psnr-prompts", "0", "--dtype", "float32"])
    for n in ("1", "2"):
        r = result["speed"][n]
        assert len(r["a_over_b_per_round"]) == 2 and all(x > 0 for x in r["a_over_b_per_round"])
        assert set(r["chunk_s"]) == {"sdpa", "gemm"}
    assert "psnr_vs_float32_db" not in result


@pytest.mark.parametrize("argv", [["--a", "gemm", "--b", "gemm"], ["--rounds", "0"], ["--psnr-prompts", "9"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        attention_ab.main(argv)
    assert exc.value.code == 2
