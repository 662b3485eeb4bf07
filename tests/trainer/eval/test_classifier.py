"""Attribute classifier: shapes, preprocessing, a few steps learn, checkpoint round trip, trained accuracy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgen.model.weights import save_checkpoint
from trainer.data.attributes import ATTRIBUTE_KEYS, ATTRIBUTE_VALUES
from trainer.eval import classifier_train
from trainer.eval.classifier import (
    CHECKPOINT_KIND,
    DEFAULT_CHECKPOINT,
    AttributeClassifier,
    ClassifierConfig,
    load_classifier,
    resize_frames,
    window,
    window_starts,
)

from .conftest import tiny_classifier_config

REPO = Path(__file__).resolve().parents[3]


def test_forward_shapes(tiny_classifier: AttributeClassifier) -> None:
    cfg = tiny_classifier.cfg
    video = torch.zeros(3, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    logits = tiny_classifier(video)
    assert list(logits) == list(ATTRIBUTE_KEYS)
    for key in ATTRIBUTE_KEYS:
        assert logits[key].shape == (3, len(ATTRIBUTE_VALUES[key]))
    assert tiny_classifier.features(video).shape == (3, cfg.feature_dim)


def test_default_config_geometry() -> None:
    cfg = ClassifierConfig()
    assert cfg.span_frames == (cfg.num_frames - 1) * cfg.frame_stride + 1
    cfg.check_vocabulary()
    with pytest.raises(ValueError, match="multiple of"):
        ClassifierConfig(image_size=60)
    with pytest.raises(ValueError, match="do not match"):
        dataclasses.replace(cfg, num_classes=(2,) * len(ATTRIBUTE_KEYS)).check_vocabulary()


def test_preprocessing_resizes_any_input_size() -> None:
    cfg = tiny_classifier_config()
    for size in (8, 32, 128):
        frames = np.random.default_rng(0).integers(0, 256, size=(10, size, size, 3), dtype=np.uint8)
        x = resize_frames(frames, cfg.image_size)
        assert x.shape == (3, 10, cfg.image_size, cfg.image_size) and x.min() >= -1 and x.max() <= 1
    assert window_starts(10, cfg, hop_frames=2) == [0, 2]
    assert window(x, 3, cfg).shape == (3, cfg.num_frames, cfg.image_size, cfg.image_size)
    with pytest.raises(ValueError, match="at least 7 frames"):
        window_starts(6, cfg, hop_frames=1)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    cfg = classifier_train.train_config({"model": dataclasses.asdict(tiny_classifier_config()), "render_size": 32})
    data = classifier_train.render_windows("train", 0, 8, cfg, random_start=True)
    model = AttributeClassifier(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    x, labels = classifier_train.to_input(data.videos), torch.from_numpy(data.labels)
    losses = []
    for _ in range(15):
        loss = classifier_train.loss_fn(model(x), labels, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0], losses


def test_checkpoint_round_trip(tmp_path: Path, tiny_classifier: AttributeClassifier) -> None:
    path = tmp_path / "clf.safetensors"
    save_checkpoint(tiny_classifier, path, kind=CHECKPOINT_KIND, config=tiny_classifier.cfg)
    loaded = load_classifier(path)
    video = torch.randn(2, 3, 4, 16, 16)
    torch.testing.assert_close(loaded(video)["colour"], tiny_classifier(video)["colour"])
    save_checkpoint(tiny_classifier, path, kind="vae", config=tiny_classifier.cfg)
    with pytest.raises(ValueError, match="expected a 'attr_classifier'"):
        load_classifier(path)


def test_checkpoint_without_stem_hidden_channels_loads_the_one_conv_stem(tmp_path: Path) -> None:
    """Checkpoints written before ``stem_hidden_channels`` existed (the committed one) record no such key."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = dataclasses.replace(tiny_classifier_config(), stem_hidden_channels=0)
    model = AttributeClassifier(cfg).eval()
    assert not any(k.startswith("stem_pre") for k in model.state_dict())
    path = tmp_path / "old.safetensors"
    save_checkpoint(model, path, kind=CHECKPOINT_KIND, config=cfg)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata["config"])
    del config["stem_hidden_channels"]
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})
    loaded = load_classifier(path)
    assert loaded.cfg.stem_hidden_channels == 0
    video = torch.randn(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(loaded(video)["material"], model(video)["material"])


def test_two_layer_stem_geometry() -> None:
    cfg = dataclasses.replace(tiny_classifier_config(), stem_hidden_channels=8)
    model = AttributeClassifier(cfg)
    assert model.stem_pre is not None and model.stem.kernel_size == (cfg.stem_patch // 2,) * 2
    video = torch.zeros(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    assert model.features(video).shape == (2, cfg.feature_dim)
    with pytest.raises(ValueError, match="even stem_patch"):
        ClassifierConfig(image_size=48, stem_patch=3, stage_channels=(32,), stem_hidden_channels=16)
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        ClassifierConfig(stem_hidden_channels=12)
    # The one-conv stem keeps odd patches.
    ClassifierConfig(image_size=48, stem_patch=3, stage_channels=(32,), stem_hidden_channels=0)


def test_parallel_rendering_gives_the_serial_windows() -> None:
    cfg = classifier_train.train_config({"model": dataclasses.asdict(tiny_classifier_config()), "render_size": 32,
                                         "num_render_workers": 2})
    parallel = classifier_train.render_windows("train", 0, 3, cfg, random_start=True)
    serial = classifier_train.render_windows("train", 0, 3, dataclasses.replace(cfg, num_render_workers=1),
                                             random_start=True)
    np.testing.assert_array_equal(parallel.videos, serial.videos)
    np.testing.assert_array_equal(parallel.labels, serial.labels)


def test_trained_checkpoint_accuracy_on_heldout_clips() -> None:
    """The committed classifier on 48 held-out clips (unseen kind/colour pairs), each from frame 0.

    Thresholds sit under the accuracy measured on 600 held-out clips at training time (checkpoint
    metadata ``heldout_accuracy``: kind 0.91, colour 0.90, material 0.58, background 1.0, motion
    0.76, camera 0.95, lighting 0.99, tint 0.98); 48 clips carry ~5-7 points of noise. The
    material head is near chance (glossy highlights are a few pixels at 64 px and it trained only
    866 steps on a shared CPU), so its bound only catches a broken checkpoint.
    """
    path = REPO / DEFAULT_CHECKPOINT
    if not path.is_file():
        pytest.skip(f"{DEFAULT_CHECKPOINT} is absent: train it with python -m trainer.eval.classifier --train")
    model = load_classifier(path)
    cfg = classifier_train.train_config({"model": dataclasses.asdict(model.cfg), "num_heldout_clips": 48})
    data = classifier_train.render_windows("heldout", 7, cfg.num_heldout_clips, cfg, random_start=False)
    accuracy = classifier_train.accuracy(model, data)
    minimum = {"kind": 0.8, "colour": 0.75, "material": 0.45, "background": 0.95, "motion": 0.6, "camera": 0.85,
               "lighting": 0.9, "tint": 0.9, "mean": 0.8}
    failing = {k: (round(accuracy[k], 3), v) for k, v in minimum.items() if accuracy[k] < v}
    assert not failing, failing


def test_cli_evaluate_uses_the_checkpoint_geometry(tmp_path: Path, tiny_classifier: AttributeClassifier,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.eval.classifier import main

    path = tmp_path / "clf.safetensors"
    save_checkpoint(tiny_classifier, path, kind=CHECKPOINT_KIND, config=tiny_classifier.cfg)
    assert main(["--evaluate", "--out", str(path), "--heldout-clips", "2"]) == 0
    assert "mean=" in capsys.readouterr().out
    assert main(["--out", str(path)]) == 2
