"""``streamgen`` command line: generate writes a decodable MP4; bad input exits non-zero with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamgen.cli import main
from streamgen.video_io import read_video


def test_generate_writes_requested_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--preset", "test", "--random-init", "--prompt", "a red mug on a table",
                 "--num-frames", "14", "--seed", "3", "--out", str(out), "--no-progress", "--dtype", "float32"])
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (14, 32, 32, 3)
    assert '"frames": 14' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "nope"], "unknown preset 'nope'; valid presets: default, test, wan-1.3b"),
        (["--num-frames", "0"], "--num-frames must be > 0"),
        (["--prompt", "  "], "--prompt must not be empty"),
        (["--out", "x.avi"], "--out must end in .mp4"),
    ],
)
def test_generate_bad_input(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--preset": "test", "--num-frames": "4", "--prompt": "a can", "--out": str(tmp_path / "o.mp4")}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    argv = ["generate", "--random-init"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_requires_weights_or_random_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--preset", "test", "--prompt", "a can", "--num-frames", "4",
                 "--out", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "--random-init" in capsys.readouterr().err


def test_help_for_every_command() -> None:
    for cmd in ([], ["generate"], ["info"]):
        res = subprocess.run([sys.executable, "-m", "streamgen.cli", *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: streamgen" in res.stdout


def test_info_prints_derived_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "default"]) == 0
    out = capsys.readouterr().out
    assert '"tokens_per_frame": 64' in out and '"pixel_frames_per_chunk": 12' in out
