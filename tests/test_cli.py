"""``streamgen`` command line: generate writes a decodable MP4; bad input exits non-zero with a message."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamgen.attention import resolve_attention
from streamgen.cli import build_parser, main
from streamgen.video_io import read_video

README = Path(__file__).resolve().parents[1] / "README.md"


def test_generate_writes_requested_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--preset", "test", "--random-init", "--prompt", "a red mug on a table",
                 "--num-frames", "14", "--seed", "3", "--out", str(out), "--no-progress", "--dtype", "float32"])
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (14, 32, 32, 3)
    captured = capsys.readouterr()
    assert '"frames": 14' in captured.out
    backend, why = resolve_attention("auto", "cpu")  # gemm on a CPU with native bf16, else sdpa
    assert f"attention: {backend} ({why})" in captured.err  # the choice and why, as for the dtype
    assert "linear: onednn (auto: CPU" in captured.err


def test_prepacked_linears_with_int8_exit_2_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--preset", "test", "--random-init", "--prompt", "a can", "--num-frames", "4",
                 "--out", str(tmp_path / "o.mp4"), "--dtype", "float32", "--quantize", "int8", "--linear", "onednn"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--linear onednn cannot run here: --quantize int8" in err and "use --linear aten" in err


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


def test_an_unknown_attention_backend_exits_2_listing_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--random-init", "--preset", "test", "--prompt", "a can", "--attention", "fast"])
    assert exc.value.code == 2
    assert "invalid choice: 'fast' (choose from 'auto', 'sdpa', 'gemm'" in capsys.readouterr().err


def test_generate_requires_weights_or_random_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--preset", "test", "--prompt", "a can", "--num-frames", "4",
                 "--out", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "--random-init" in capsys.readouterr().err


def test_help_for_every_command() -> None:
    for cmd in ([], ["generate"], ["info"], ["serve"]):
        res = subprocess.run([sys.executable, "-m", "streamgen.cli", *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: streamgen" in res.stdout


def test_readme_commands_name_only_real_flags() -> None:
    """Each bullet of the README's "Commands" section names a command; every flag it mentions exists there,
    and every ``streamgen`` sub-command has a bullet."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    preamble, *bullets = section.split("\n- `")
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {f"streamgen {name}": sub.format_help() for name, sub in subcommands.items()}
    documented = set()
    for bullet in (b.split("\n\n", 1)[0] for b in bullets):  # a bullet ends at the blank line after it
        command = " ".join(bullet.split()[:3]) if bullet.startswith("python -m ") else " ".join(bullet.split()[:2])
        if command not in helps:  # python -m MODULE: ask the module itself
            res = subprocess.run([sys.executable, *command.split()[1:], "--help"], capture_output=True, text=True,
                                 cwd=README.parent, timeout=120)
            assert res.returncode == 0, f"README: {command} --help failed: {res.stderr[-500:]}"
            helps[command] = res.stdout
        documented.add(command)
        for flag in re.findall(r"--[a-z][a-z0-9-]*", bullet):
            assert flag in helps[command], f"README: {command} has no {flag}"
    assert {f"streamgen {name}" for name in subcommands} <= documented
    for flag in re.findall(r"--[a-z][a-z0-9-]*", preamble):  # the model flags shared by generate and serve
        assert flag in helps["streamgen generate"] and flag in helps["streamgen serve"], flag


def test_serving_docs_flag_table_lists_exactly_the_serve_flags() -> None:
    table = (README.parent / "docs" / "serving.md").read_text().split("## Flags", 1)[1].split("\n## ", 1)[0]
    documented = {flag for row in table.splitlines() if row.startswith("| `--")
                  for flag in re.findall(r"--[a-z][a-z0-9-]*", row.split("|")[1])}
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    flags = {o for action in serve._actions for o in action.option_strings if o.startswith("--") and o != "--help"}
    assert documented == flags


def test_serve_refuses_a_negative_warm_up_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--preset", "test", "--random-init", "--port", "0", "--warm-up-chunks", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "streamgen serve: error: --warm-up-chunks must be >= 0 (0 = no warm-up), got -1"


def test_info_prints_derived_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "default"]) == 0
    out = capsys.readouterr().out
    assert '"tokens_per_frame": 64' in out and '"pixel_frames_per_chunk": 12' in out


def test_generate_int8_tracks_float32(tmp_path: Path) -> None:
    """--quantize int8 runs end to end and stays close to the float32 frames of the same seed (the per-forward
    error compounds over chunks, so the bound is loose: a broken INT8 path gives noise, ~10 dB)."""
    import numpy as np

    outs = {}
    for mode in ("none", "int8"):
        outs[mode] = tmp_path / f"{mode}.npy"
        assert main(["generate", "--preset", "test", "--random-init", "--prompt", "a red mug", "--num-frames", "8",
                     "--seed", "2", "--out", str(outs[mode]), "--no-progress", "--dtype", "float32",
                     "--quantize", mode]) == 0
    ref, q = (np.load(outs[m]).astype(np.float64) for m in ("none", "int8"))
    assert ref.shape == q.shape == (8, 32, 32, 3)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((ref - q) ** 2), 1e-12))
    assert psnr > 25, psnr


def test_int8_with_bf16_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--preset", "test", "--random-init", "--prompt", "a can", "--num-frames", "4",
                 "--out", str(tmp_path / "o.mp4"), "--dtype", "bfloat16", "--quantize", "int8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--dtype float32" in err and "dtype:" not in err  # refused before the model was set up
