"""Suite + report writer: the files exist, the JSON is strict, curves have one value per window."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.data.captions import caption
from trainer.data.dataset import clip_identity
from trainer.eval.classifier import AttributeClassifier
from trainer.eval.inputs import render_reference
from trainer.eval.report import write_report
from trainer.eval.suite import SuiteConfig, Video, aggregate, evaluate_clip, evaluate_set, frechet_by_window

from .conftest import FPS, brighten


@pytest.fixture(scope="module")
def small_videos() -> list[Video]:
    return render_reference([None, None, None], num_frames=40, size=32, fps=FPS, seed=5)


def _strict_json(text: str) -> object:
    def bad(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_clip_evaluation_curves_and_adherence(small_videos: list[Video], tiny_classifier: AttributeClassifier
                                              ) -> None:
    clip = evaluate_clip(small_videos[0], tiny_classifier, SuiteConfig(hop_seconds=0.5))
    num_windows = 40 // 16
    assert clip.curves["overexposure/luma"].shape == (num_windows,)
    assert clip.classifier is not None and clip.classifier.starts == list(range(0, 40 - 7 + 1, 8))
    assert clip.classifier.features.shape == (len(clip.classifier.starts), tiny_classifier.cfg.feature_dim)
    assert clip.attributes is not None and set(clip.classifier.adherence_first) == set(clip.attributes)
    assert clip.curves["adherence/whole_clip_keys"].shape == (len(clip.classifier.starts),)


def test_report_files(tmp_path: Path, small_videos: list[Video], tiny_classifier: AttributeClassifier) -> None:
    cfg = SuiteConfig(frechet_dims=1)
    over = [Video(v.name + "_bright", brighten(v.frames, 3.0), v.fps, v.prompt) for v in small_videos]
    generated = evaluate_set(over, tiny_classifier, cfg)
    reference = evaluate_set(small_videos, tiny_classifier, cfg)
    assert generated.flag_rates["overexposure"] == 1.0 and reference.flag_rates["overexposure"] == 0.0
    frechet = frechet_by_window(generated, reference, cfg)
    assert frechet and all(math.isfinite(r.distance) for r in frechet.values())
    paths = write_report(tmp_path / "rep", "rep", {"generated": generated, "reference": reference}, frechet, FPS,
                         {"source": "test"}, cfg)
    for kind in ("markdown", "json", "drift_curves", "frechet_plot"):
        assert paths[kind].is_file() and paths[kind].stat().st_size > 0, kind
    data = _strict_json(paths["json"].read_text())
    assert data["sets"]["generated"]["num_clips"] == 3
    assert data["sets"]["generated"]["clips"][0]["flags"]["overexposure"] is True
    assert data["frechet"][0]["num_generated"] == 3
    md = paths["markdown"].read_text()
    for heading in ("## Failure modes", "## Prompt adherence", "## Frechet distance", "## Drift curves"):
        assert heading in md
    assert paths["drift_curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_without_classifier_or_prompts() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    clip = evaluate_clip(Video("noise", frames, FPS, prompt="free text, not a caption"))
    assert clip.attributes is None and clip.classifier is None
    agg = aggregate([clip])
    assert agg.adherence_per_head == {} and set(agg.flag_rates) == set(clip.metrics)


def test_reference_uses_the_prompt_when_it_is_a_caption(small_videos: list[Video]) -> None:
    again = render_reference([small_videos[1].prompt, "free text"], num_frames=4, size=32, fps=FPS, seed=9)
    assert again[0].prompt == small_videos[1].prompt
    assert again[1].prompt == caption(clip_identity(9, "heldout", 1)[0])  # unparseable -> a held-out spec
