"""Border-palette segmentation: exact morphology on hand-made masks, IoU against the renderer's true masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.attributes import BACKGROUNDS, ClipSpec
from trainer.data.dataset import clip_identity
from trainer.data.renderer import render_frames
from trainer.eval.segment import (
    SegmentConfig,
    fill_holes,
    largest_component,
    mask_iou,
    segment_object,
    upsample_mask,
)

from .conftest import SIZE


def test_fill_holes_and_largest_component_exact() -> None:
    ring = torch.zeros(1, 9, 9, dtype=torch.bool)
    ring[0, 2:7, 2:7] = True
    ring[0, 4, 4] = False
    filled = fill_holes(ring)
    assert filled[0, 4, 4] and int(filled.sum()) == 25
    two = torch.zeros(1, 10, 10, dtype=torch.bool)
    two[0, 0:2, 0:2] = True  # 4 pixels
    two[0, 5:9, 5:8] = True  # 12 pixels
    kept = largest_component(two)
    assert int(kept.sum()) == 12 and not kept[0, 0, 0]


def test_flat_background_square_is_found_exactly() -> None:
    frames = np.full((2, SIZE, SIZE, 3), 200, dtype=np.uint8)
    frames[:, 20:40, 24:44] = (30, 60, 200)
    seg = segment_object(frames)
    truth = np.zeros((2, SIZE, SIZE), dtype=bool)
    truth[:, 20:40, 24:44] = True
    np.testing.assert_array_equal(seg.mask, truth)
    assert seg.reliable.all()


def test_object_reaching_the_border_columns_is_unreliable() -> None:
    frames = np.full((1, SIZE, SIZE, 3), 200, dtype=np.uint8)
    cfg = SegmentConfig()
    frames[:, 20:40, cfg.border_columns:40] = (30, 60, 200)  # starts right at the sample band
    assert not segment_object(frames, cfg).reliable[0]


def test_iou_against_true_masks_on_rendered_clips() -> None:
    """Two clips per background (varied kinds, colours, cameras), 3 frames each, at the analysis size.

    Measured with these seeds (deterministic): mean IoU 0.79, median 0.92; the failures are products
    coloured like their background. At the generated size (128 px, 270 frames of 90 clips): mean 0.82,
    median 0.91 (see trainer/eval/segment.py).
    """
    ious: dict[str, list[float]] = {bg: [] for bg in BACKGROUNDS}
    for i in range(40):
        spec, seed = clip_identity(123, "train", i)
        if len(ious[spec.background]) >= 2:
            continue
        clip = render_frames(spec, [0, 16, 32], SIZE, SIZE, seed=seed)
        seg = segment_object(clip.frames)
        ious[spec.background].append(float(mask_iou(seg.mask, clip.mask).mean()))
    values = [v for vs in ious.values() for v in vs]
    assert len(values) == 2 * len(BACKGROUNDS)
    assert np.mean(values) > 0.75, ious
    assert np.median(values) > 0.8, ious


def test_upsampled_mask_matches_truth_at_full_size() -> None:
    spec = ClipSpec(kind="jar", colour="green", background="blue_gradient", camera="static")
    clip = render_frames(spec, [0, 8], 128, 128, seed=1)
    seg = segment_object(clip.frames)
    assert seg.mask.shape == (2, SIZE, SIZE)
    assert mask_iou(upsample_mask(seg.mask, 128, 128), clip.mask).min() > 0.8


def test_mask_iou_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.zeros((1, 4, 4), bool), np.zeros((1, 5, 5), bool))
