"""Captions say exactly the spec's attributes, deterministically, and parse back."""

from __future__ import annotations

import pytest

from trainer.data.attributes import BACKGROUNDS, CAMERAS, MOTIONS, TINTS, ClipSpec, attribute_dict, sample_clip_spec
from trainer.data.captions import (
    BACKGROUND_PHRASES,
    CAMERA_PHRASES,
    MOTION_PHRASES,
    TINT_WORDS,
    caption,
    caption_attributes,
    parse_caption,
)


def test_phrase_tables_cover_the_vocabulary() -> None:
    assert set(MOTION_PHRASES) == set(MOTIONS)
    assert set(BACKGROUND_PHRASES) == set(BACKGROUNDS)
    assert set(CAMERA_PHRASES) == set(CAMERAS)
    assert set(TINT_WORDS) == set(TINTS)


def test_example_caption() -> None:
    spec = ClipSpec(kind="bottle", colour="red", material="glossy", background="white_table", motion="slow",
                    camera="zoom_in", lighting="soft")
    assert caption(spec) == "a glossy red bottle turning slowly on a white table, camera zooming in, soft lighting"
    warm = ClipSpec(kind="shoe", colour="black", motion="still", camera="static", lighting="dim", tint="warm")
    assert caption(warm) == "a matte black shoe standing still on a white table, static camera, dim warm lighting"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_caption_words_match_attributes(split: str) -> None:
    for seed in range(300):
        spec = sample_clip_spec(seed, split=split)
        text = caption(spec)
        words = text.replace(",", "").split()
        assert words[:4] == ["a", spec.material, spec.colour, spec.kind]
        assert MOTION_PHRASES[spec.motion] in text
        assert BACKGROUND_PHRASES[spec.background] in text
        assert CAMERA_PHRASES[spec.camera] in text
        assert text.endswith(f"{spec.lighting} {TINT_WORDS[spec.tint]}lighting")
        assert caption(spec) == text
        assert parse_caption(text) == spec
        assert caption_attributes(text) == attribute_dict(spec)


def test_parse_rejects_foreign_text() -> None:
    with pytest.raises(ValueError):
        parse_caption("a cat sitting on a sofa")
    with pytest.raises(ValueError):
        parse_caption("a glossy red teapot turning slowly on a white table, camera zooming in, soft lighting")
