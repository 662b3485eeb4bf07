"""benchmarks/engine_ab.py: configurations parsed and resolved as serving resolves them, alternated rounds,
a verdict only when every round agrees, and bad configurations refused with exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import engine_ab  # noqa: E402


def test_a_configuration_names_only_what_differs_from_serving() -> None:
    assert engine_ab.parse_config("quantize=int8, linear=aten") == {"attention": "auto", "linear": "aten",
                                                                    "quantize": "int8"}
    assert engine_ab.parse_config("") == engine_ab.DEFAULTS
    for bad, match in (("linear", "expected key=value"), ("dtype=float32", "expected key=value"),
                       ("linear=mkl", "choose one of auto, onednn, aten")):
        with pytest.raises(ValueError, match=match):
            engine_ab.parse_config(bad)


def test_the_verdict_needs_every_round_of_enough_rounds() -> None:
    n = engine_ab.MIN_ROUNDS
    assert engine_ab.verdict([1.05] * n) == "b faster"
    assert engine_ab.verdict([0.9] * n) == "a faster"
    assert engine_ab.verdict([1.2] * (n - 1) + [0.99]) == "not separable"  # one round the other way
    assert engine_ab.verdict([1.2] * (n - 1)) == "not separable"  # too few rounds for a sign test


def test_alternated_rounds_on_the_test_preset(capsys: pytest.CaptureFixture[str]) -> None:
    result = engine_ab.main(["--preset", "test", "--threads", "1", "--rounds", "2", "--chunks", "1",
                             "--a", "linear=aten", "--b", "quantize=int8,linear=aten"])
    r = result["speed"]["1"]
    assert len(r["a_over_b_per_round"]) == 2 and all(x > 0 for x in r["a_over_b_per_round"])
    assert r["verdict"] == "not separable"  # two rounds can never separate
    assert result["a"]["quantize"] == "none" and result["b"]["quantize"] == "int8"
    assert "b faster in" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--a", "linear=aten", "--b", "linear=aten"], "resolve to the same kernels"),
    (["--a", "linear=onednn,quantize=int8", "--b", "linear=aten"], "--linear onednn cannot run here"),
    (["--a", "quantize=int8", "--b", "linear=aten", "--dtype", "bfloat16"], "needs the float32 model"),
    (["--a", "speed=max", "--b", "linear=aten"], "expected key=value"),
    (["--a", "linear=aten", "--b", "linear=onednn", "--rounds", "0"], "must be >= 1"),
])
def test_bad_configurations_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        engine_ab.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_backend_that_cannot_run_here_exits_2_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from streamgen.attention import BackendUnavailableError, get_backend

    try:
        get_backend("flash")
    except BackendUnavailableError as exc:
        with pytest.raises(SystemExit) as raised:
            engine_ab.main(["--a", "attention=flash", "--b", "attention=sdpa"])
        assert raised.value.code == 2 and "attention=flash:" in capsys.readouterr().err and str(exc)
    else:
        pytest.skip("flash-attn runs here (a CUDA machine with flash-attn): nothing to refuse")
