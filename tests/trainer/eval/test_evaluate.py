"""``python -m trainer.evaluate`` end to end on tiny MP4s, plus argument and prompt-file validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamgen.model.weights import save_checkpoint
from streamgen.video_io import write_mp4
from trainer.eval.classifier import CHECKPOINT_KIND, AttributeClassifier
from trainer.eval.inputs import find_videos, load_clips, load_prompts, render_reference, save_clips
from trainer.evaluate import build_parser, main

from .conftest import FPS


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0 and "--reference" in capsys.readouterr().out


def test_end_to_end_on_mp4_files(tmp_path: Path, tiny_classifier: AttributeClassifier) -> None:
    videos_dir = tmp_path / "videos"
    videos_dir.mkdir()
    prompts = {}
    for i, v in enumerate(render_reference([None, None], num_frames=24, size=32, fps=FPS, seed=2)):
        write_mp4(videos_dir / f"clip{i}.mp4", v.frames, int(FPS))
        prompts[f"clip{i}.mp4"] = v.prompt
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    clf = tmp_path / "clf.safetensors"
    save_checkpoint(tiny_classifier, clf, kind=CHECKPOINT_KIND, config=tiny_classifier.cfg,
                    extra_metadata={"heldout_accuracy": json.dumps({"kind": 0.5})})
    out = tmp_path / "reports" / "tiny"
    code = main(["--videos", str(videos_dir), "--prompts", str(tmp_path / "prompts.json"), "--reference", "rendered",
                 "--classifier", str(clf), "--out", str(out), "--threads", "1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["sets"]) == {"evaluated", "reference (rendered)"}
    clips = report["sets"]["evaluated"]["clips"]
    assert [c["name"] for c in clips] == ["clip0.mp4", "clip1.mp4"] and clips[0]["fps"] == FPS
    assert clips[0]["attributes"] is not None and clips[0]["classifier"]["adherence_first"] is not None
    assert report["classifier_accuracy"] == {"kind": 0.5}
    assert "classifier accuracy (rendered held-out)" in (out / "report.md").read_text()
    assert (out / "drift_curves.png").is_file()


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["--transformer", "x.safetensors", "--out", str(tmp_path / "r")]) == 2
    assert main(["--videos", str(tmp_path), "--out", str(tmp_path / "r")]) == 2  # no videos there
    assert "no videos found" in capsys.readouterr().err


def test_prompt_file_formats(tmp_path: Path) -> None:
    mapping = tmp_path / "a.json"
    mapping.write_text(json.dumps({"x.mp4": "p1"}))
    listing = tmp_path / "b.json"
    listing.write_text(json.dumps([{"video": "y.mp4", "prompt": "p2"}]))
    assert load_prompts(mapping) == {"x.mp4": "p1"} and load_prompts(listing) == {"y.mp4": "p2"}
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="no videos found"):
        find_videos(tmp_path / "*.mp4")


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Randomly initialised ``test``-preset transformer and VAE (with unit latent stats) checkpoints."""
    from streamgen.config import get_preset
    from streamgen.model.transformer import CausalWanTransformer
    from streamgen.model.vae import CausalVideoVAE
    from trainer.common.latents import LatentStats

    preset = get_preset("test")
    tmp = tmp_path_factory.mktemp("random_ckpts")
    save_checkpoint(CausalWanTransformer(preset.model), tmp / "model.safetensors", kind="transformer",
                    config=preset.model)
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    save_checkpoint(CausalVideoVAE(preset.vae), tmp / "vae.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    return tmp / "model.safetensors", tmp / "vae.safetensors"


@pytest.mark.parametrize("source", ["--transformer", "--teacher"])
def test_generate_and_evaluate_with_random_weights(tmp_path: Path, source: str,
                                                   random_checkpoints: tuple[Path, Path],
                                                   tiny_classifier: AttributeClassifier) -> None:
    model, vae = random_checkpoints
    clf = tmp_path / "clf.safetensors"
    save_checkpoint(tiny_classifier, clf, kind=CHECKPOINT_KIND, config=tiny_classifier.cfg)
    out = tmp_path / "rep"
    code = main([source, str(model), "--vae", str(vae), "--preset", "test", "--num-clips", "2", "--num-frames", "24",
                 "--teacher-steps", "2", "--text-encoder", "hash", "--classifier", str(clf), "--out", str(out),
                 "--threads", "1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    label = "student" if source == "--transformer" else "teacher"
    clips = report["sets"][label]["clips"]
    assert len(clips) == 2 and all(c["num_frames"] == 24 for c in clips)
    assert len(list((out / "videos").glob("*.mp4"))) == 2


def test_rendered_reference_adds_kid_adherence_and_stability(tmp_path: Path, tiny_classifier: AttributeClassifier
                                                             ) -> None:
    clf = tmp_path / "clf.safetensors"
    save_checkpoint(tiny_classifier, clf, kind=CHECKPOINT_KIND, config=tiny_classifier.cfg)
    out = tmp_path / "rep"
    assert main(["--rendered", "8", "--num-frames", "40", "--size", "32", "--hop-seconds", "1", "--reference",
                 "rendered", "--classifier", str(clf), "--out", str(out), "--threads", "1"]) == 0
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert "KID x 1000, first window (95 % interval)" in meta and "stability of luma vs the rendered clips" in meta
    details = json.loads((out / "against_reference.json").read_text())
    assert details["num_clips"] == 8 and set(details["adherence"]) == {"first", "last"}


def test_clip_store_round_trip_and_mismatch(tmp_path: Path) -> None:
    videos = render_reference([None, None], num_frames=6, size=16, fps=FPS, seed=1)
    meta = {"checkpoint_sha256": "ab", "seed": 0, "num_frames": 6}
    save_clips(tmp_path / "set", videos, meta)
    back = load_clips(tmp_path / "set", meta)
    assert back is not None and [v.prompt for v in back] == [v.prompt for v in videos]
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(back, videos, strict=True))  # lossless
    assert load_clips(tmp_path / "set", {**meta, "checkpoint_sha256": "cd"}) is None  # another checkpoint
    assert load_clips(tmp_path / "other", meta) is None
