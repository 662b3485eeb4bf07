"""Attribute vocabulary, spec validation, seeded sampling and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.attributes import (
    ATTRIBUTE_KEYS,
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COMBINATIONS,
    KINDS,
    ClipSpec,
    attribute_dict,
    attribute_index,
    is_heldout_combination,
    sample_clip_spec,
)


def test_vocabulary_sizes() -> None:
    assert {"bottle", "mug", "box", "can", "shoe", "jar"} <= set(KINDS)
    assert len(COLOURS) >= 8 and len(BACKGROUNDS) >= 5
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in COLOURS.values())
    assert set(ATTRIBUTE_VALUES) == set(ATTRIBUTE_KEYS)


def test_spec_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        ClipSpec(kind="teapot", colour="red")
    with pytest.raises(ValueError, match="camera"):
        ClipSpec(kind="mug", colour="red", camera="dolly")


def test_same_seed_same_spec_and_generator_accepted() -> None:
    assert sample_clip_spec(17) == sample_clip_spec(17)
    assert sample_clip_spec(np.random.default_rng(5)) == sample_clip_spec(np.random.default_rng(5))
    assert len({sample_clip_spec(s) for s in range(50)}) > 40
    with pytest.raises(ValueError, match="split"):
        sample_clip_spec(0, split="test")


def test_heldout_pairs_never_in_train_always_in_heldout() -> None:
    train = [sample_clip_spec(seed, split="train") for seed in range(2000)]
    assert not any(spec.is_heldout for spec in train)
    heldout = [sample_clip_spec(seed, split="heldout") for seed in range(300)]
    assert all(is_heldout_combination(spec.kind, spec.colour) for spec in heldout)
    assert {(s.kind, s.colour) for s in heldout} == set(HELDOUT_COMBINATIONS)
    # Compositional: every held-out kind and colour is seen in training, only not together.
    seen_kinds, seen_colours = {s.kind for s in train}, {s.colour for s in train}
    assert all(k in seen_kinds and c in seen_colours for k, c in HELDOUT_COMBINATIONS)
    # The other attributes cover their whole vocabulary in both splits.
    for key in ("material", "background", "motion", "camera", "lighting", "tint"):
        assert {getattr(s, key) for s in train} == set(ATTRIBUTE_VALUES[key])
        assert {getattr(s, key) for s in heldout} == set(ATTRIBUTE_VALUES[key])


def test_attribute_dict_and_index() -> None:
    spec = ClipSpec(kind="jar", colour="teal", material="glossy", background="dark_studio", motion="fast",
                    camera="pan_left", lighting="dim", tint="warm")
    attrs = attribute_dict(spec)
    assert attrs == {"kind": "jar", "colour": "teal", "material": "glossy", "background": "dark_studio",
                     "motion": "fast", "camera": "pan_left", "lighting": "dim", "tint": "warm"}
    index = attribute_index(spec)
    assert all(ATTRIBUTE_VALUES[k][index[k]] == v for k, v in attrs.items())
