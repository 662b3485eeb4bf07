"""benchmarks/vae_decode.py: each layout's decode FLOPs and time side by side, bad checkpoints refused."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from streamgen.config import get_preset
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import vae_decode  # noqa: E402


def _vae_file(path: Path, post_grow_blocks: int, preset: str = "test") -> str:
    cfg = dataclasses.replace(get_preset(preset).vae, post_grow_blocks=post_grow_blocks)
    save_checkpoint(CausalVideoVAE(cfg), path, kind="vae", config=cfg)
    return str(path)


def test_layouts_are_timed_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, grown = _vae_file(tmp_path / "base.safetensors", 0), _vae_file(tmp_path / "grown.safetensors", 1)
    result = vae_decode.main([base, grown, "--preset", "test", "--rounds", "2", "--repeats", "1",
                              "--dtype", "float32", "--latent-frames", "2"])
    rows = result["vaes"]
    assert [rows[p]["post_grow_blocks"] for p in (base, grown)] == [0, 1]
    assert rows[grown]["decode_gflop"] > rows[base]["decode_gflop"] > 0  # the post-grow block adds convs
    assert rows[base]["over_first"]["float32"] == 1.0 and rows[grown]["ms"]["float32"] > 0
    assert "| post-grow / pre-pool blocks |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as missing:
        vae_decode.main([str(tmp_path / "none.safetensors"), "--preset", "test"])
    assert missing.value.code == 2
    with pytest.raises(SystemExit) as other_preset:  # a default-preset VAE cannot serve the test preset
        vae_decode.main([_vae_file(tmp_path / "default.safetensors", 0, preset="default"), "--preset", "test"])
    assert other_preset.value.code == 2
