"""``python -m trainer.compare``: teacher and students side by side at several lengths (tiny, random weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import save_checkpoint
from trainer.common.latents import LatentStats
from trainer.compare import main, parse_student, ratio
from trainer.eval.classifier import CHECKPOINT_KIND, AttributeClassifier, ClassifierConfig


def test_ratio_is_last_over_first_finite_window() -> None:
    assert ratio(np.array([2.0, np.nan, 3.0, 2.5])) == pytest.approx(1.25)
    assert math.isnan(ratio(np.array([0.0, 1.0])))  # undefined against a zero first window
    assert math.isnan(ratio(np.array([1.0])))
    assert math.isnan(ratio(None))


def test_student_argument_is_name_equals_path() -> None:
    spec = parse_student("sf=runs/x.safetensors")
    assert (spec.name, spec.kind, str(spec.checkpoint)) == ("sf", "student", "runs/x.safetensors")
    with pytest.raises(ValueError, match="NAME=CHECKPOINT"):
        parse_student("runs/x.safetensors")


def test_compare_teacher_and_students_at_two_lengths(tmp_path: Path) -> None:
    preset = get_preset("test")
    torch.manual_seed(0)
    model = CausalWanTransformer(preset.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, tmp_path / "teacher.safetensors", kind="transformer", config=preset.model,
                    extra_metadata={"num_latent_frames": "2"})
    save_checkpoint(model, tmp_path / "student.safetensors", kind="transformer", config=preset.model)
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    save_checkpoint(CausalVideoVAE(preset.vae), tmp_path / "vae.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    clf_cfg = ClassifierConfig(num_frames=4, frame_stride=2, image_size=16, stem_patch=2, stem_channels=8,
                               stage_channels=(8, 16), feature_dim=12, pooled_size=2)
    save_checkpoint(AttributeClassifier(clf_cfg), tmp_path / "clf.safetensors", kind=CHECKPOINT_KIND, config=clf_cfg)
    out = tmp_path / "cmp"
    student = f"s1={tmp_path / 'student.safetensors'}"
    code = main(["--teacher", str(tmp_path / "teacher.safetensors"), "--student", student,
                 "--vae", str(tmp_path / "vae.safetensors"), "--classifier", str(tmp_path / "clf.safetensors"),
                 "--preset", "test", "--multiples", "1", "3", "--num-clips", "2", "--teacher-steps", "2",
                 "--text-encoder", "hash", "--threads", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    rows = report["rows"]
    # The teacher exists only at its own horizon; the student at every length.
    assert sorted(rows) == ["s1@1x", "s1@3x", "teacher@1x"]
    horizon_frames = preset.pixel_frames(2)
    assert rows["teacher@1x"]["frames"] == rows["s1@1x"]["frames"] == horizon_frames
    assert rows["s1@3x"]["frames"] == preset.pixel_frames(6)
    assert set(rows["s1@3x"]["stability"]) >= {"luma", "motion", "subject area", "adherence"}
    text = (out / "compare.md").read_text()
    assert "| s1 | 3x |" in text and "| teacher | 1x |" in text
    assert (out / "curves_1x.png").is_file() and (out / "curves_3x.png").is_file()
    assert (out / "s1_3x" / "report.md").is_file()


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--student", f"s={tmp_path / 'none.safetensors'}", "--horizon", "2", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gallery_writes_strips_gifs_and_markdown(tmp_path: Path) -> None:
    from PIL import Image

    from trainer.gallery import main as gallery_main

    preset = get_preset("test")
    save_checkpoint(CausalWanTransformer(preset.model), tmp_path / "s.safetensors", kind="transformer",
                    config=preset.model)
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    save_checkpoint(CausalVideoVAE(preset.vae), tmp_path / "vae.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    out = tmp_path / "gallery"
    code = gallery_main(["--transformer", str(tmp_path / "s.safetensors"), "--vae", str(tmp_path / "vae.safetensors"),
                         "--preset", "test", "--prompt", "a red mug", "--prompt", "a blue can", "--seconds", "1",
                         "--strip-frames", "3", "--text-encoder", "hash", "--out", str(out)])
    assert code == 0
    assert Image.open(out / "0.png").size == (3 * preset.video.width, preset.video.height)
    gif = Image.open(out / "1.gif")
    total_ms = 0
    for i in range(gif.n_frames):  # PIL merges identical consecutive frames, adding up their durations
        gif.seek(i)
        total_ms += gif.info["duration"]
    # One second of video; GIF stores delays in centiseconds, so each 62 ms frame becomes 60 ms.
    assert total_ms == preset.video.fps * (round(1000 / preset.video.fps) // 10 * 10)
    assert "| a blue can |" in (out / "gallery.md").read_text()
    assert gallery_main(["--transformer", str(tmp_path / "none.safetensors"), "--out", str(out)]) == 2
