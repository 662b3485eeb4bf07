"""``python -m trainer.compare``: teacher and students against the rendered reference (tiny, random weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from streamgen.config import Preset, get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import save_checkpoint
from trainer.common.latents import LatentStats
from trainer.compare import main, parse_split_clips, parse_student
from trainer.eval.classifier import CHECKPOINT_KIND, AttributeClassifier, ClassifierConfig


def test_split_clips_argument() -> None:
    assert parse_split_clips(["heldout=16", "in_distribution=64"]) == {"heldout": 16, "in_distribution": 64}
    with pytest.raises(ValueError, match="SPLIT=N"):
        parse_split_clips(["train=3"])


def test_student_argument_is_name_equals_path() -> None:
    spec = parse_student("sf=runs/x.safetensors")
    assert (spec.name, spec.kind, str(spec.checkpoint)) == ("sf", "student", "runs/x.safetensors")
    with pytest.raises(ValueError, match="NAME=CHECKPOINT"):
        parse_student("runs/x.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        parse_student("rendered=x.safetensors")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("ckpt")
    preset = get_preset("test")
    torch.manual_seed(0)
    model = CausalWanTransformer(preset.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, tmp_path / "teacher.safetensors", kind="transformer", config=preset.model,
                    extra_metadata={"num_latent_frames": "2"})
    save_checkpoint(model, tmp_path / "student.safetensors", kind="transformer", config=preset.model,
                    extra_metadata={"stage": "self_forcing", "num_latent_frames": "2"})
    save_checkpoint(model, tmp_path / "student_h3.safetensors", kind="transformer", config=preset.model,
                    extra_metadata={"stage": "self_forcing", "num_latent_frames": "3"})
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    save_checkpoint(CausalVideoVAE(preset.vae), tmp_path / "vae.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    clf_cfg = ClassifierConfig(num_frames=4, frame_stride=2, image_size=16, stem_patch=2, stem_channels=8,
                               stage_channels=(8, 16), feature_dim=12, pooled_size=2)
    save_checkpoint(AttributeClassifier(clf_cfg), tmp_path / "clf.safetensors", kind=CHECKPOINT_KIND, config=clf_cfg)
    return tmp_path


def _args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--vae", str(ckpt / "vae.safetensors"), "--classifier", str(ckpt / "clf.safetensors"),
            "--preset", "test", "--teacher-steps", "2", "--text-encoder", "hash", "--threads", "1",
            "--resamples", "50", "--out", str(out), *extra]


def test_compare_teacher_and_student_against_the_rendered_reference(tiny_checkpoints: Path, tmp_path: Path
                                                                    ) -> None:
    ckpt = tiny_checkpoints
    out = tmp_path / "cmp"
    argv = _args(ckpt, out, "--teacher", str(ckpt / "teacher.safetensors"),
                 "--student", f"s1={ckpt / 'student.safetensors'}", "--multiples", "1", "3", "--num-clips", "8",
                 "--long-clips", "3", "--splits", "heldout")
    assert main(argv) == 0
    report = json.loads((out / "compare.json").read_text())
    rows = report["rows"]
    # The teacher exists only at its own horizon; the student and the rendered reference at every length.
    assert sorted(rows) == ["rendered@heldout@1x", "rendered@heldout@3x", "s1@heldout@1x", "s1@heldout@3x",
                            "teacher@heldout@1x"]
    assert rows["s1@heldout@1x"]["num_windows"] == 1 and rows["s1@heldout@3x"]["num_windows"] > 1
    assert rows["s1@heldout@1x"]["stability"] == {}
    assert set(rows["s1@heldout@3x"]["stability"]) == {"luma", "motion", "subject area", "adherence"}
    kid = rows["s1@heldout@1x"]["distances"]["first"]["kid"]
    assert kid["low"] <= kid["high"] and kid["n"] == 8 and math.isfinite(kid["value"])
    assert rows["rendered@heldout@1x"]["distances"]["first"]["kid"]["value"] == pytest.approx(0.0, abs=1e-9)
    # 8 clips are too few for a 16-component Frechet distance: reported as such, never a biased number.
    assert rows["s1@heldout@1x"]["distances"]["first"]["frechet"] is None
    assert {v["verdict"] for v in report["orderings"]} <= {"not separable", "teacher better than s1",
                                                           "s1 better than teacher"}
    text = (out / "compare.md").read_text()
    # Three long clips: stability is judged, KID is n/a with its reason, never a number from too few clips.
    long_kid = rows["s1@heldout@3x"]["distances"]["last"]
    assert long_kid["kid"] is None and "KID needs 8 clips" in long_kid["note"]
    assert "| s1 | heldout | 3x | 3 |" in text and "## Stability per clip: heldout, 3x" in text
    assert "## Adherence per attribute: heldout, 3x, last window" in text
    assert (out / "s1_heldout_3x" / "report.md").is_file() and (out / "s1_heldout_3x" / "clips.npz").is_file()
    stored = json.loads((out / "s1_heldout_3x" / "clips.json").read_text())
    assert stored["num_frames"] == get_preset("test").pixel_frames(6) and len(stored["checkpoint_sha256"]) == 64


def test_vae_row_is_the_rendered_clips_through_the_vae(tiny_checkpoints: Path, tmp_path: Path) -> None:
    from streamgen.model.weights import load_vae
    from streamgen.video_io import frames_to_uint8, uint8_to_frames
    from trainer.eval.inputs import reconstruct_videos, render_reference, split_prompts

    ckpt = tiny_checkpoints
    preset = get_preset("test")
    frames = preset.pixel_frames(5)
    rendered = render_reference(split_prompts("heldout", 3), frames, preset.video.height, 8.0, seed=7)
    # Chunk by chunk in batches of two (a batch boundary and a chunk boundary inside the clip) equals the
    # whole-clip decode(encode(x)) of each clip alone, to one grey level.
    recon = reconstruct_videos(rendered, ckpt / "vae.safetensors", "test", batch_size=2,
                               chunk_frames=2 * preset.vae.temporal_factor)
    vae = load_vae(ckpt / "vae.safetensors", expected=preset.vae).eval()
    for r, v in zip(recon, rendered, strict=True):
        with torch.no_grad():
            whole = frames_to_uint8(vae(uint8_to_frames(v.frames)[None])[0])
        assert r.frames.shape == v.frames.shape and r.prompt == v.prompt and r.object_area is v.object_area
        assert int(abs(r.frames.astype(int) - whole.astype(int)).max()) <= 1
    with pytest.raises(ValueError, match="multiple of"):
        reconstruct_videos(rendered, ckpt / "vae.safetensors", "test", chunk_frames=preset.vae.temporal_factor + 1)

    out = tmp_path / "vae_row"
    assert main(_args(ckpt, out, "--vae-row", "--horizon", "2", "--multiples", "1", "--num-clips", "8",
                      "--splits", "heldout")) == 0
    report = json.loads((out / "compare.json").read_text())
    assert sorted(report["rows"]) == ["rendered@heldout@1x", "vae@heldout@1x"]
    row = report["rows"]["vae@heldout@1x"]
    assert row["num_clips"] == 8 and math.isfinite(row["distances"]["first"]["kid"]["value"])
    assert "| vae | heldout | 1x | 8 |" in (out / "compare.md").read_text()
    assert report["orderings"] == []  # the VAE row is a reference, never ordered against a model
    with pytest.raises(ValueError, match="reserved"):
        parse_student("vae=x.safetensors")


def test_stored_latents_are_decoded_by_a_vae_of_the_same_latent_space(
        tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another decoder on the same encoder decodes the stored latents (frames equal generating afresh with it);
    a VAE with another encoder generates again."""
    import numpy as np

    from streamgen.model.weights import load_vae, read_metadata

    ckpt = tiny_checkpoints
    preset = get_preset("test")
    vae = load_vae(ckpt / "vae.safetensors", expected=preset.vae)
    enc = {id(p) for p in vae.encoder_parameters()}
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    with torch.no_grad():
        for p in vae.parameters():
            if id(p) not in enc:
                p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(vae, tmp_path / "vae_dec.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    other = CausalVideoVAE(preset.vae)
    with torch.no_grad():
        next(iter(other.encoder_parameters())).add_(1.0)
    save_checkpoint(other, tmp_path / "vae_enc.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    assert read_metadata(tmp_path / "vae_dec.safetensors")["latent_mean"]

    student = ["--teacher", str(ckpt / "teacher.safetensors"), "--student", f"s={ckpt / 'student.safetensors'}",
               "--multiples", "1", "--num-clips", "8", "--splits", "heldout"]

    def frames(out: Path) -> np.ndarray:
        return np.concatenate([np.load(out / f"{m}_heldout_1x" / "clips.npz")["frames"] for m in ("s", "teacher")])

    shared = tmp_path / "shared"
    assert main(_args(ckpt, shared, *student)) == 0
    assert "generating s" in capsys.readouterr().out
    args = _args(ckpt, shared, *student)
    args[args.index("--vae") + 1] = str(tmp_path / "vae_dec.safetensors")
    assert main(args) == 0
    logged = capsys.readouterr().out
    assert "decoding stored latents of s" in logged and "decoding stored latents of teacher" in logged
    fresh = tmp_path / "fresh"
    args[args.index("--out") + 1] = str(fresh)
    assert main(args) == 0
    assert "generating s" in capsys.readouterr().out
    assert np.array_equal(frames(shared), frames(fresh))
    args = _args(ckpt, shared, *student)
    args[args.index("--vae") + 1] = str(tmp_path / "vae_enc.safetensors")
    assert main(args) == 0
    assert "generating s" in capsys.readouterr().out
    # Stored clips are matched by the VAE file's content, not its path: a file replaced in place is not reused.
    (tmp_path / "vae_enc.safetensors").write_bytes((ckpt / "vae.safetensors").read_bytes())
    assert main(args) == 0
    logged = capsys.readouterr().out
    assert "reusing stored clips of s" not in logged and "generating s" in logged
    assert main(args) == 0  # unchanged since: reused
    assert "reusing stored clips of s" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    ckpt = tiny_checkpoints
    out = tmp_path / "bad"
    assert main(["--student", f"s={tmp_path / 'none.safetensors'}", "--horizon", "2", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--num-clips", "4")) == 2
    assert "must be >= 8" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--long-clips", "1")) == 2
    assert "--long-clips must be >= 2" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--split-clips", "heldout=4")) == 2
    assert "--split-clips must be >= 8" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--teacher", str(ckpt / "student.safetensors"))) == 2
    assert "not the bidirectional teacher" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'teacher.safetensors'}", "--horizon", "2")) == 2
    assert "is it the teacher?" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--teacher", str(ckpt / "teacher.safetensors"),
                      "--student", f"s={ckpt / 'student_h3.safetensors'}")) == 2
    assert "horizon of 3 latent frames" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'vae.safetensors'}", "--horizon", "2")) == 2
    assert "not a transformer" in capsys.readouterr().err
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--splits", "train")) == 2
    assert "unknown split" in capsys.readouterr().err


def _tiny_gallery_models(tmp_path: Path) -> Preset:
    """A random test-preset student and VAE as ``s.safetensors`` and ``vae.safetensors`` in ``tmp_path``."""
    preset = get_preset("test")
    save_checkpoint(CausalWanTransformer(preset.model), tmp_path / "s.safetensors", kind="transformer",
                    config=preset.model)
    stats = LatentStats((0.0,) * preset.vae.latent_channels, (1.0,) * preset.vae.latent_channels)
    save_checkpoint(CausalVideoVAE(preset.vae), tmp_path / "vae.safetensors", kind="vae", config=preset.vae,
                    extra_metadata=stats.metadata())
    return preset


def test_gallery_writes_strips_gifs_and_markdown(tmp_path: Path) -> None:
    from PIL import Image

    from trainer.gallery import main as gallery_main

    preset = _tiny_gallery_models(tmp_path)
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


def test_gallery_draws_captions_per_split_and_captions_what_the_classifier_reads(tmp_path: Path) -> None:
    from trainer.eval.inputs import split_prompts
    from trainer.gallery import describe_reading
    from trainer.gallery import main as gallery_main

    _tiny_gallery_models(tmp_path)
    base = ["--transformer", str(tmp_path / "s.safetensors"), "--vae", str(tmp_path / "vae.safetensors"),
            "--preset", "test", "--seconds", "1", "--text-encoder", "hash"]
    out = tmp_path / "drawn"
    assert gallery_main([*base, "--draw", "2", "--draw-seed", "3", "--out", str(out)]) == 0
    table = (out / "gallery.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| in_distribution") or line.startswith("| heldout")]
    expected = [("in_distribution", p) for p in split_prompts("in_distribution", 2, 3)] + \
        [("heldout", p) for p in split_prompts("heldout", 2, 3)]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == expected
    assert all("right" in row or "wrong: asked" in row for row in rows)  # every template caption was read
    assert "right in" in table and (out / "3.gif").is_file()
    # The reading cell names what was asked where the classifier saw something else.
    prompt = split_prompts("heldout", 1, 0)[0]
    from trainer.data.captions import caption_attributes
    asked = caption_attributes(prompt)
    other = next(c for c in ("red", "blue", "green") if c != asked["colour"])
    assert describe_reading(prompt, {"kind": asked["kind"], "colour": asked["colour"]}).endswith("(both right)")
    assert describe_reading(prompt, {"kind": asked["kind"], "colour": other}) == \
        f"{other} {asked['kind']} (colour wrong: asked {asked['colour']})"
    assert describe_reading("a red mug", None) == "-"
    # Bad input: a clear error, exit 2.
    assert gallery_main([*base, "--draw", "1", "--prompt", "a red mug", "--out", str(out)]) == 2
    assert gallery_main([*base, "--draw", "1", "--splits", "train", "--out", str(out)]) == 2
    assert gallery_main([*base, "--draw", "1", "--classifier", str(tmp_path / "no.safetensors"),
                         "--out", str(out)]) == 2


def test_paired_cli_on_stored_sets(tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    from trainer.eval import paired

    ckpt = tiny_checkpoints
    out = tmp_path / "p"
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--multiples", "1", "--num-clips", "8", "--splits", "heldout")) == 0
    capsys.readouterr()
    one = out / "s_heldout_1x"
    assert paired.main(["--a", str(one), "--b", str(one), "--classifier", str(ckpt / "clf.safetensors"),
                        "--resamples", "50", "--out", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["clips"] == 8
    assert all(r["difference"]["value"] == 0 and r["verdict"] == "not separable"
               for r in result["windows"]["first"].values())
    assert "| first | kind |" in capsys.readouterr().out
    assert paired.main(["--a", str(one), "--b", str(tmp_path), "--classifier", str(ckpt / "clf.safetensors")]) == 2
    assert "holds no stored clips" in capsys.readouterr().err
    longer = out / "s_heldout_3x"  # the same captions at another length pair on the first window only
    assert main(_args(ckpt, out, "--student", f"s={ckpt / 'student.safetensors'}", "--horizon", "2",
                      "--multiples", "3", "--num-clips", "8", "--splits", "heldout")) == 0
    capsys.readouterr()
    assert paired.main(["--a", str(one), "--b", str(longer), "--classifier", str(ckpt / "clf.safetensors"),
                        "--resamples", "50", "--out", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["num_frames"][0] < first["num_frames"][1] and list(first["windows"]) == ["first"]
    capsys.readouterr()
    assert paired.main(["--a", str(one), "--b", str(longer), "--classifier", str(ckpt / "clf.safetensors"),
                        "--windows", "first", "last"]) == 2
    assert "differ in ['num_frames']" in capsys.readouterr().err
