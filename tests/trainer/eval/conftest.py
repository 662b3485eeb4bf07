"""Shared rendered clips and a tiny classifier for the evaluation-suite tests (small frames, few frames)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.attributes import ClipSpec
from trainer.data.renderer import RenderedClip, render_clip
from trainer.eval.classifier import AttributeClassifier, ClassifierConfig

FPS = 16.0
SIZE = 64  # the segmentation's analysis size: no resizing, and 4x cheaper to render than 128


def tiny_classifier_config() -> ClassifierConfig:
    return ClassifierConfig(num_frames=4, frame_stride=2, image_size=16, stem_patch=2, stem_channels=8,
                            stage_channels=(8, 16), feature_dim=12, pooled_size=2)


@pytest.fixture(scope="session")
def normal_clip() -> RenderedClip:
    """A turning can on a white table, static camera: nothing should be flagged."""
    spec = ClipSpec(kind="can", colour="red", material="matte", background="white_table", motion="slow",
                    camera="static", lighting="soft", tint="neutral")
    return render_clip(spec, 48, SIZE, SIZE, FPS, seed=3)


@pytest.fixture
def tiny_classifier() -> AttributeClassifier:
    return AttributeClassifier(tiny_classifier_config()).eval()


def brighten(frames: np.ndarray, final_gain: float) -> np.ndarray:
    """Progressive over-exposure: frame t is multiplied by a gain rising linearly from 1 to ``final_gain``."""
    gains = np.linspace(1.0, final_gain, frames.shape[0])[:, None, None, None]
    return np.clip(frames.astype(np.float64) * gains, 0, 255).astype(np.uint8)
