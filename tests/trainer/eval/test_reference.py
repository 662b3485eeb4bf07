"""A generated set against its rendered reference, on constructed evaluations (no rendering, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.data.attributes import ATTRIBUTE_KEYS, ATTRIBUTE_VALUES
from trainer.data.captions import caption
from trainer.data.dataset import clip_identity
from trainer.eval.reference import (
    ReferenceConfig,
    attribute_adherence,
    set_stability,
    stability_against_reference,
    summarise_against_reference,
)
from trainer.eval.suite import TRUE_AREA_CURVE, ClassifierEvaluation, ClipEvaluation, SetEvaluation, aggregate

CFG = ReferenceConfig(num_resamples=200, frechet_resamples=20)


def _clip(i: int, attributes: dict[str, str], curves: dict[str, np.ndarray],
          first: dict[str, str] | None = None, last: dict[str, str] | None = None,
          features: np.ndarray | None = None) -> ClipEvaluation:
    first = first or attributes
    last = last or first
    feats = features if features is not None else np.zeros((2, 4))
    classified = ClassifierEvaluation([0, 16], [first, last], feats, None, None)
    return ClipEvaluation(f"clip{i}", caption_of(attributes), attributes, 32, 16.0, {}, 1.0, curves, classified)


def caption_of(attributes: dict[str, str]) -> str:
    from trainer.data.attributes import ClipSpec

    return caption(ClipSpec(**attributes))


def _attrs(n: int, seed: int = 0) -> list[dict[str, str]]:
    return [dict(clip_identity(seed, "train", i)[0].__dict__) for i in range(n)]


def _set(clips: list[ClipEvaluation]) -> SetEvaluation:
    return aggregate(clips)


def _other(key: str, value: str) -> str:
    return next(v for v in ATTRIBUTE_VALUES[key] if v != value)


def test_opposite_drifts_cancel_in_the_set_mean_but_are_flagged() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(1.0, 0.03, 32)
    generated = np.where(np.arange(32) % 2 == 0, 1.5, 0.6)  # half grow, half shrink
    assert abs(generated.mean() - 1.0) < 0.2  # the old set-mean test would have passed it
    result = stability_against_reference("subject area", generated, reference, CFG)
    assert result.flagged and result.share_outside.value == 1.0
    assert result.median_abs_deviation.value > 0.3


def test_a_set_matching_the_references_own_drift_is_not_flagged() -> None:
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.08, 0.2, 32)  # the renderer's camera moves ease out: motion falls to ~0.13
    generated = reference * rng.normal(1.0, 0.02, 32)
    result = stability_against_reference("motion", generated, reference, CFG)
    assert not result.flagged and result.share_outside.value <= 0.2
    assert result.median_abs_deviation.high < 0.01
    # Tested against 1 instead, every clip would have "drifted".
    assert np.all(np.abs(generated - 1.0) > 0.2)


def test_stability_with_too_few_defined_ratios_is_not_judged() -> None:
    result = stability_against_reference("luma", [1.0, math.nan], [1.0, 1.1], CFG)
    assert not result.flagged and "not judged" in result.note and math.isnan(result.share_outside.value)


def test_set_stability_pairs_clips_by_caption_and_drops_misread_areas() -> None:
    attrs = _attrs(12)
    ref_clips, gen_clips = [], []
    for i, a in enumerate(attrs):
        truth = np.array([0.2, 0.1])  # the object truly halves
        read = np.array([0.2, 0.2]) if i == 0 else truth  # clip 0: the segmentation misreads it
        ref_clips.append(_clip(i, a, {"subject_drift/area_fraction": read, TRUE_AREA_CURVE: truth,
                                      "overexposure/luma": np.array([0.5, 0.5])}))
        gen_clips.append(_clip(i, a, {"subject_drift/area_fraction": np.array([0.2, 0.4]),
                                      "overexposure/luma": np.array([0.5, 0.5])}))
    stability = set_stability(_set(gen_clips), _set(ref_clips), CFG)
    area = stability["subject area"]
    assert area.num_judged == 11 and math.isnan(area.ratios[0]) and "1 captions unmeasured" in area.note
    assert area.flagged  # grew 2x where the truth halves
    assert not stability["luma"].flagged
    with pytest.raises(ValueError, match="do not share a caption"):
        set_stability(_set(gen_clips[1:] + gen_clips[:1]), _set(ref_clips), CFG)


def test_unmeasured_attribute_is_excluded_from_the_mean() -> None:
    attrs = _attrs(40)
    rng = np.random.default_rng(2)
    ref_clips, gen_clips = [], []
    for i, a in enumerate(attrs):
        # The classifier reads material at chance on rendered clips, everything else right.
        read = dict(a, material=str(rng.choice(ATTRIBUTE_VALUES["material"])))
        ref_clips.append(_clip(i, a, {}, read))
        # The generated clips get every attribute right except material, which is always wrong.
        gen_clips.append(_clip(i, a, {}, dict(a, material=_other("material", a["material"]))))
    generated, reference = _set(gen_clips), _set(ref_clips)
    per = attribute_adherence(generated, reference, "first", CFG)
    assert not per["material"].measured and per["material"].generated.value == 0.0
    assert all(per[k].measured for k in ATTRIBUTE_KEYS if k != "material")
    summary = summarise_against_reference(generated, reference, CFG)
    assert "material" not in summary.measured["first"]
    assert summary.adherence_mean["first"].value == pytest.approx(1.0)
    assert summary.as_dict()["unmeasured"]["first"] == ["material"]


def test_last_window_adherence_is_the_last_windows() -> None:
    attrs = _attrs(16)
    ref_clips = [_clip(i, a, {}) for i, a in enumerate(attrs)]
    # Right at the start, the colour lost by the end.
    gen_clips = [_clip(i, a, {}, a, dict(a, colour=_other("colour", a["colour"]))) for i, a in enumerate(attrs)]
    summary = summarise_against_reference(_set(gen_clips), _set(ref_clips), CFG)
    assert summary.adherence["first"]["colour"].generated.value == 1.0
    assert summary.adherence["last"]["colour"].generated.value == 0.0
    assert summary.adherence["last"]["colour"].rendered.value == 1.0


def test_distances_report_kid_and_refuse_frechet_below_its_sample_count() -> None:
    rng = np.random.default_rng(3)
    attrs = _attrs(16)
    ref_clips = [_clip(i, a, {}, features=rng.normal(size=(2, 40))) for i, a in enumerate(attrs)]
    gen_clips = [_clip(i, a, {}, features=rng.normal(size=(2, 40)) + 1.0) for i, a in enumerate(attrs)]
    summary = summarise_against_reference(_set(gen_clips), _set(ref_clips), CFG)
    d = summary.distances["first"]
    assert d.kid is not None and d.kid.low > 0
    assert d.frechet is None and "needs 32 clips per set, got 16" in d.note
    small = ReferenceConfig(num_resamples=50, frechet_resamples=10, frechet_dims=4)
    d4 = summarise_against_reference(_set(gen_clips), _set(ref_clips), small).distances["first"]
    assert d4.frechet is not None and d4.frechet.value > 0


def test_paired_difference_separates_where_set_intervals_overlap() -> None:
    """Same captions: B misreads colour on 12 of 64 clips more than A, both miss many; the per-clip difference
    separates from 0 while the two sets' own intervals overlap. Kind is equal in both: not separable."""
    from trainer.eval.paired import difference_verdict, paired_adherence
    from trainer.eval.stats import Interval, order

    attrs = _attrs(64)
    hard = set(range(0, 64, 2))  # half the captions: both read the colour wrong
    worse = set(range(1, 24, 2))  # 12 more where only B does
    a_clips, b_clips = [], []
    for i, at in enumerate(attrs):
        wrong = {**at, "colour": _other("colour", at["colour"])}
        a_clips.append(_clip(i, at, {}, first=wrong if i in hard else at))
        b_clips.append(_clip(i, at, {}, first=wrong if i in hard | worse else at))
    a, b = _set(a_clips), _set(b_clips)
    per = paired_adherence(a, b, "first", ("A", "B"), num_resamples=500)
    colour = per["colour"]
    assert colour["a"]["value"] == pytest.approx(0.5) and colour["b"]["value"] == pytest.approx(20 / 64)
    assert colour["difference"]["value"] == pytest.approx(12 / 64) and colour["difference"]["low"] > 0
    assert colour["verdict"] == "A better than B"
    ia, ib = (Interval(colour[k]["value"], colour[k]["low"], colour[k]["high"], 64, 0.95) for k in "ab")
    assert order("A", ia, "B", ib, True) == "not separable"  # the unpaired rule cannot tell
    assert per["kind"]["difference"]["value"] == 0 and per["kind"]["verdict"] == "not separable"
    assert difference_verdict("A", "B", Interval(-0.2, -0.3, -0.1, 64, 0.95)) == "B better than A"
    assert difference_verdict("A", "B", Interval(0.1, 0.0, 0.2, 64, 0.95)) == "not separable"
    # Sets of other captions (or another order) are refused.
    with pytest.raises(ValueError, match="do not share a caption"):
        paired_adherence(a, _set(b_clips[1:] + b_clips[:1]))
    with pytest.raises(ValueError, match="the same clips"):
        paired_adherence(a, _set(b_clips[:10]))


def test_latent_probe_reads_a_kept_channel_and_not_a_dropped_one() -> None:
    """Latents that carry R and B linearly but not G: R^2 near 1 for R and B, near 0 (or below) for G."""
    from trainer.eval.latent_probe import linear_probe_r2

    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, (150, 3))
    mix = rng.normal(size=(2, 16))
    latents = rgb[:, [0, 2]] @ mix + rng.normal(scale=1.0, size=(150, 16))  # G is not in the latents
    r2 = linear_probe_r2(latents, rgb)
    assert r2[0] > 0.99 and r2[2] > 0.99 and r2[1] < 0.2
    with pytest.raises(ValueError, match="too few"):
        linear_probe_r2(latents[:12], rgb[:12])


def test_pairing_needs_equal_lengths_past_the_first_window() -> None:
    from trainer.eval.paired import pairing_mismatch

    a = {"prompts": ["p", "q"], "seed": 0, "num_frames": 48, "fps": 16}
    assert pairing_mismatch(a, dict(a), ["first"]) == []
    longer = {**a, "num_frames": 24}  # a model of another horizon: its first window is the same span
    assert pairing_mismatch(a, longer, ["first"]) == []
    assert pairing_mismatch(a, longer, ["first", "last"]) == ["num_frames"]
    assert pairing_mismatch(a, longer, ["last"]) == ["num_frames"]
    assert pairing_mismatch(a, {**longer, "prompts": ["q", "p"]}, ["first"]) == ["prompts"]
    assert pairing_mismatch(a, {**a, "seed": 1, "fps": 8}, ["first"]) == ["seed", "fps"]


def test_frechet_interval_is_bias_corrected_and_holds_its_point() -> None:
    """Resamples with repeated clips read a larger distance than the sets themselves: the plain
    percentile interval lies above the point estimate; the reported one is shifted back and holds it."""
    from trainer.eval.frechet import frechet_distance
    from trainer.eval.reference import frechet_interval

    rng = np.random.default_rng(5)
    g, r = rng.normal(size=(64, 16)), rng.normal(size=(64, 16)) + 0.3
    point = frechet_distance(g, r).distance
    draws = np.array([frechet_distance(g[rng.integers(0, 64, 64)], r[rng.integers(0, 64, 64)]).distance
                      for _ in range(200)])
    assert np.quantile(draws, 0.025) > point  # the uncorrected interval misses its own point
    iv = frechet_interval(point, draws, 64, 0.95)
    assert iv.low < point < iv.high
    assert iv.high - iv.low == pytest.approx(np.quantile(draws, 0.975) - np.quantile(draws, 0.025))
    assert frechet_interval(0.1, np.array([5.0, 6.0, 7.0]), 8, 0.95).low == 0.0  # floored at 0
    assert math.isnan(frechet_interval(1.0, np.array([np.nan]), 8, 0.95).low)
