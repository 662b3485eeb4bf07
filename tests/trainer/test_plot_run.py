"""trainer.plot_run: curves from a run's TensorBoard events, a resume's repeated steps, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from trainer.plot_run import main, moving_average, read_scalars


def _write(run: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(run / "tb"))
    for tag, values in points.items():
        for step, value in values:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_a_resumed_run_is_one_curve_and_later_values_win(tmp_path: Path) -> None:
    run = tmp_path / "sf"
    _write(run, {"train/loss": [(s, 1.0) for s in range(0, 10)]})
    _write(run, {"train/loss": [(s, 2.0) for s in range(6, 14)]})  # resumed from step 6: a second event file
    steps, values = read_scalars(run)["train/loss"]
    assert steps.tolist() == list(range(14))
    assert values.tolist() == [1.0] * 6 + [2.0] * 8


def test_moving_average_is_trailing() -> None:
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_average(np.array([4.0, 8.0]), 1), [4.0, 8.0])


def test_plot_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "a", {"train/loss": [(s, 10.0 - s) for s in range(10)], "eval/adherence": [(5, 0.5), (9, 0.7)]})
    _write(tmp_path / "b", {"train/loss": [(s, 3.0) for s in range(10)]})
    out = tmp_path / "plot.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--tags", "train/loss", "eval/adherence",
                 "--smooth", "3", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > Image.open(out).size[1]  # two panels side by side
    report = json.loads(capsys.readouterr().out)
    a = report["runs"][str(tmp_path / "a")]
    assert a["train/loss"] == {"first_step": 0, "last_step": 9, "points": 10, "mean_first_fifth": 9.5,
                               "mean_last_fifth": 1.5}
    assert a["eval/adherence"]["points"] == 2
    assert "eval/adherence" not in report["runs"][str(tmp_path / "b")]  # b has no such tag: no line, no entry


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    _write(tmp_path / "a", {"train/loss": [(0, 1.0)]})
    assert main([str(tmp_path / "a"), "--tags", "train/nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "tags there are: ['train/loss']" in capsys.readouterr().err
