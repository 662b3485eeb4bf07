"""trainer.eval.conditioning: the share of each attribute's mean effect a model reproduces, on constructed clips
where the right share is known, and the CLI's refusals on a tiny teacher and latent dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import save_checkpoint
from trainer.eval import conditioning as cond

SHAPE = (2, 3, 4, 4)  # C, F, H, W of the constructed clips


def _population(n: int, seed: int = 0, effect: float = 1.0, other_effect: float = 0.0, noise: float = 1.0):
    """Clips ``X = mu_A[a] + mu_B[b] + noise`` with attributes A (4 values) and B (3 values) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    mu_a = effect * torch.randn(4, *SHAPE, generator=g)
    mu_b = other_effect * torch.randn(3, *SHAPE, generator=g)
    a = torch.randint(4, (n,), generator=g)
    b = torch.randint(3, (n,), generator=g)
    x = mu_a[a] + mu_b[b] + noise * torch.randn(n, *SHAPE, generator=g)
    attrs = [{"A": f"a{int(i)}", "B": f"b{int(j)}"} for i, j in zip(a, b, strict=True)]
    return x, mu_a[a], mu_b[b], attrs


def _share(result: dict, key: str, part: str = "total"):
    return result[key][part]["share"]


def test_a_model_that_predicts_the_group_means_has_share_one_and_one_that_ignores_the_word_zero() -> None:
    x, means_a, _, attrs = _population(400)
    g = torch.Generator().manual_seed(1)
    jitter = 0.3 * torch.randn(x.shape, generator=g)  # a model's own noise around its answer
    full = cond.measure(cond.grams(x, means_a + jitter), attrs, keys=["A"], num_resamples=200)
    half = cond.measure(cond.grams(x, 0.5 * means_a + jitter), attrs, keys=["A"], num_resamples=200)
    none = cond.measure(cond.grams(x, jitter), attrs, keys=["A"], num_resamples=200)
    assert full["A"]["total"]["readable"]
    assert abs(_share(full, "A").value - 1.0) < 0.1 and _share(full, "A").contains(1.0)
    assert abs(_share(half, "A").value - 0.5) < 0.1 and _share(half, "A").contains(0.5)
    assert abs(_share(none, "A").value) < 0.1 and _share(none, "A").contains(0.0)


def _naive_share(x: torch.Tensor, p: torch.Tensor, labels: list[str]) -> float:
    """The textbook between-group slope, which pairs every clip with itself inside its group mean."""
    x, p = x.flatten(1).double(), p.flatten(1).double()
    bxy = bxx = 0.0
    for v in set(labels):
        rows = [i for i, label in enumerate(labels) if label == v]
        dx, dp = x[rows].mean(0) - x.mean(0), p[rows].mean(0) - p.mean(0)
        bxy += len(rows) * float(dp @ dx)
        bxx += len(rows) * float(dx @ dx)
    return bxy / bxx


def test_another_attribute_in_the_caption_does_not_leak_into_the_share() -> None:
    """A model that knows only B, on few clips where B's effect is large: A's share stays ~0, where the
    textbook between-group sum (a clip paired with itself) credits it with a large part of A's effect."""
    shares, naive = [], []
    for seed in range(16):
        x, _, means_b, attrs = _population(80, seed=seed, effect=1.0, other_effect=3.0, noise=0.5)
        result = cond.measure(cond.grams(x, means_b), attrs, keys=["A", "B"], num_resamples=100, seed=seed)
        assert abs(_share(result, "B").value - 1.0) < 0.15
        assert result["A"]["total"]["readable"]
        shares.append(_share(result, "A").value)
        naive.append(_naive_share(x, means_b, [a["A"] for a in attrs]))
    assert abs(float(np.mean(shares))) < 0.12, shares
    assert float(np.mean(naive)) > 0.2, naive  # the setup is one where the leak is large


def test_static_and_temporal_parts_split_the_total_and_read_half_a_move_as_half() -> None:
    n = 300
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(3, (n,), generator=g)
    layout = torch.randn(3, SHAPE[0], 1, *SHAPE[2:], generator=g)  # per value: where things are (all frames)
    trend = torch.linspace(-1, 1, SHAPE[1]).view(1, 1, -1, 1, 1) * torch.randn(3, SHAPE[0], 1, *SHAPE[2:],
                                                                                generator=g)  # the move
    x = (layout + trend)[labels] + torch.randn(n, *SHAPE, generator=g)
    attrs = [{"camera": f"c{int(v)}"} for v in labels]
    parts = cond.grams(x, (layout + 0.5 * trend)[labels])  # the right layout, half the move
    for name in ("xx", "px"):
        total = getattr(parts["total"], name)
        np.testing.assert_allclose(getattr(parts["static"], name) + getattr(parts["temporal"], name), total,
                                   rtol=1e-9, atol=1e-9)
    result = cond.measure(parts, attrs, keys=["camera"], num_resamples=200)
    assert abs(_share(result, "camera", "static").value - 1.0) < 0.05
    assert abs(_share(result, "camera", "temporal").value - 0.5) < 0.1


def test_an_attribute_without_effect_in_the_data_is_unreadable() -> None:
    x, _, _, attrs = _population(200, effect=0.0)
    result = cond.measure(cond.grams(x, x.clone()), attrs, keys=["A"], num_resamples=200)
    assert not result["A"]["total"]["readable"] and result["A"]["total"]["share"] is None
    assert result["A"]["total"]["data_effect"].contains(0.0)


def test_bad_inputs_raise() -> None:
    x, means_a, _, attrs = _population(12)
    with pytest.raises(ValueError, match="both be"):
        cond.grams(x, means_a[:5])
    with pytest.raises(ValueError, match="clips' attributes"):
        cond.measure(cond.grams(x, means_a), attrs[:5], keys=["A"])
    lonely = [dict(a, A="a0") for a in attrs]
    lonely[0] = dict(attrs[0], A="rare")
    with pytest.raises(ValueError, match="rare \\(1\\)"):
        cond.measure(cond.grams(x, means_a), lonely, keys=["A"])
    with pytest.raises(ValueError, match="no attribute"):
        cond.measure(cond.grams(x, means_a), [dict(a, A="a0") for a in attrs], keys=["A"])


def test_rare_values_that_most_resamples_lose_raise_instead_of_hanging() -> None:
    x, means_a, _, attrs = _population(60)
    rare = [dict(a, A="common") for a in attrs]
    for i in range(0, 20, 2):  # ten values of two clips each: ~0.4^10 of resamples keep them all
        rare[i], rare[i + 1] = dict(rare[i], A=f"r{i}"), dict(rare[i + 1], A=f"r{i}")
    with pytest.raises(ValueError, match="too few clips per value for a bootstrap"):
        cond.measure(cond.grams(x, means_a), rare, keys=["A"], num_resamples=100)


def test_predictions_read_the_crop_start_whatever_the_batch() -> None:
    """A model with a frame-position embedding is asked at the crop's clip positions, for every clip of every
    batch, and a clip's prediction does not depend on the batch it is in."""
    from tests.conftest import seeded_tiny_model

    cfg = dataclasses.replace(get_preset("test").model, frame_embeddings=12)
    model = seeded_tiny_model(cfg, seed=0)
    emb = torch.randn(10, cfg.text_max_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(2))
    shape = (cfg.latent_channels, 3, 4, 4)
    with torch.no_grad():
        by8 = cond.predict_mean_clips(model, emb, shape, seed=5, start=4, batch=8, progress=False)
        by1 = cond.predict_mean_clips(model, emb, shape, seed=5, start=4, batch=1, progress=False)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(5 + 9))[None]
        t = torch.full((1,), 1000.0)
        direct = noise - model(noise, t, model.encode_text(emb[9:10]), frame_offsets=4)
        at_zero = cond.predict_mean_clips(model, emb, shape, seed=5, start=0, batch=8, progress=False)
    torch.testing.assert_close(by8, by1, rtol=0, atol=1e-5)
    torch.testing.assert_close(by8[9:10], direct, rtol=0, atol=1e-5)
    assert (by8 - at_zero).abs().max() > 1e-3  # the embedding is read: another start, another answer


def test_per_clip_shares_read_a_clips_own_parts() -> None:
    """A prediction holding each clip's layout and half its move reads static 1 and temporal 0.5; one with the
    layout in every frame (no frame differs) reads temporal 0; swapping clips' predictions reads ~0."""
    n = 64
    g = torch.Generator().manual_seed(4)
    layout = torch.randn(n, SHAPE[0], 1, *SHAPE[2:], generator=g)
    move = torch.randn(n, *SHAPE, generator=g)
    move = move - move.mean(dim=2, keepdim=True)
    x = layout + move
    half = cond.per_clip_shares(x, layout + 0.5 * move, num_resamples=200)
    assert abs(half["static"].value - 1.0) < 1e-9 and abs(half["temporal"].value - 0.5) < 1e-9
    assert half["temporal"].low <= 0.5 <= half["temporal"].high
    still = cond.per_clip_shares(x, layout.expand_as(x), num_resamples=200)
    assert abs(still["temporal"].value) < 1e-12
    swapped = cond.per_clip_shares(x, x.roll(1, dims=0), num_resamples=200)
    assert abs(swapped["static"].value) < 0.3 and abs(swapped["temporal"].value) < 0.3
    with pytest.raises(ValueError, match=">= 2 clips"):
        cond.per_clip_shares(x[:1], x[:1])


def test_predict_x0_noises_the_clip_and_matches_the_mean_clip_prediction_at_1000() -> None:
    from streamgen.model.sampler import add_noise
    from tests.conftest import seeded_tiny_model

    cfg = get_preset("test").model
    model = seeded_tiny_model(cfg, seed=1)
    emb = torch.randn(5, cfg.text_max_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(3))
    shape = (cfg.latent_channels, 3, 4, 4)
    clips = torch.randn(5, *shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        at_1000 = cond.predict_x0(model, emb, shape, seed=2, batch=2, progress=False, clips=clips)
        mean = cond.predict_mean_clips(model, emb, shape, seed=2, batch=3, progress=False)
        at_500 = cond.predict_x0(model, emb, shape, seed=2, batch=2, progress=False, clips=clips, timestep=500.0)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(2 + 4))[None]
        t = torch.full((1,), 500.0)
        x_t = add_noise(clips[4:5], noise, t)
        direct = x_t - 0.5 * model(x_t, t, model.encode_text(emb[4:5]))
    torch.testing.assert_close(at_1000, mean, rtol=0, atol=1e-5)  # the clip is gone at t = 1000
    torch.testing.assert_close(at_500[4:5], direct, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the clips"):
        cond.predict_x0(model, emb, shape, seed=2, progress=False, timestep=500.0)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conditioning")
    preset = get_preset("test")
    n, frames, side = 24, 3, preset.latent_height
    g = torch.Generator().manual_seed(0)
    colours = ["red", "blue", "green"]
    attributes = [{"colour": colours[i % 3], "camera": ["static", "zoom_in"][i % 2]} for i in range(n)]
    latents = torch.randn(n, preset.model.latent_channels, frames, side, side, generator=g)
    latents += torch.tensor([i % 3 for i in range(n)], dtype=torch.float32).view(n, 1, 1, 1, 1)
    captions = [f"a {a['colour']} thing, {a['camera']}" for a in attributes]
    unique = sorted(set(captions))
    data = root / "latents"
    data.mkdir()
    save_file({"latents": latents,
               "text_emb": torch.randn(len(unique), preset.model.text_max_tokens, preset.model.text_dim, generator=g),
               "caption_ids": torch.tensor([unique.index(c) for c in captions])}, str(data / "latents.safetensors"))
    (data / "manifest.json").write_text(json.dumps({"spec": {"vae_checkpoint": "vae_a.safetensors"},
                                                    "captions": captions, "attributes": attributes}))
    torch.manual_seed(0)
    model = CausalWanTransformer(preset.model)
    paths = {"latents": data}
    for name, meta in {"teacher": {"vae_checkpoint": "vae_a.safetensors", "num_latent_frames": "2"},
                       "other_vae": {"vae_checkpoint": "vae_b.safetensors", "num_latent_frames": "2"},
                       "student": {"vae_checkpoint": "vae_a.safetensors", "num_latent_frames": "2",
                                   "stage": "self_forcing"},
                       "no_horizon": {"vae_checkpoint": "vae_a.safetensors"}}.items():
        paths[name] = root / f"{name}.safetensors"
        save_checkpoint(model, paths[name], kind="transformer", config=preset.model, extra_metadata=meta)
    return paths


def test_cli_measures_a_tiny_teacher(tiny_setup: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    rc = cond.main(["--checkpoint", str(tiny_setup["teacher"]), "--latents", str(tiny_setup["latents"]),
                    "--resamples", "100", "--start", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["meta"]["clips"] == 24 and doc["meta"]["horizon"] == 2 and doc["meta"]["start"] == 1
    assert set(doc["attributes"]) == {"colour", "camera"}
    colour = doc["attributes"]["colour"]["static"]
    assert colour["readable"] and colour["data_effect"]["value"] > 0.1  # the constructed offset per colour
    assert "| colour |" in capsys.readouterr().out


def test_cli_per_clip_mode(tiny_setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    rc = cond.main(["--checkpoint", str(tiny_setup["teacher"]), "--latents", str(tiny_setup["latents"]),
                    "--resamples", "100", "--num-clips", "3", "--per-clip", "1000", "250", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err  # no attribute groups needed: 3 clips are enough
    doc = json.loads(out.read_text())
    assert list(doc["per_clip"]) == ["1000", "250"] and doc["meta"]["timesteps"] == [1000.0, 250.0]
    # an untrained model's x_0 from a mostly clean clip holds more of the clip than from pure noise
    assert doc["per_clip"]["250"]["static"]["value"] > doc["per_clip"]["1000"]["static"]["value"]
    assert "| 250 |" in capsys.readouterr().out
    rc = cond.main(["--checkpoint", str(tiny_setup["teacher"]), "--latents", str(tiny_setup["latents"]),
                    "--resamples", "100", "--num-clips", "3", "--per-clip", "1000", "--pool", "1", "2",
                    "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert list(doc["per_clip"]) == ["1000, pool 1", "1000, pool 2"]
    kept = doc["meta"]["data temporal energy kept by each pool"]
    assert kept["1"] == 1.0 and 0 < kept["2"] < 1  # i.i.d. constructed clips: averaging 4 pixels keeps ~1/4


def test_spatial_pool_averages_blocks() -> None:
    x = torch.arange(2 * 1 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 1, 4, 4)
    pooled = cond.spatial_pool(x, 2)
    assert pooled.shape == (2, 1, 1, 2, 2)
    assert pooled[0, 0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4 and pooled[1, 0, 0, 1, 1] == (26 + 27 + 30 + 31) / 4
    assert torch.equal(cond.spatial_pool(x, 1), x)


@pytest.mark.parametrize("name, extra, message", [
    ("student", [], "distilled student"),
    ("other_vae", [], "latent space"),
    ("no_horizon", [], "records no horizon"),
    ("teacher", ["--start", "2"], "does not fit"),
    ("teacher", ["--num-clips", "0"], "--num-clips"),
    ("teacher", ["--num-clips", "3"], "every value needs"),
    ("teacher", ["--resamples", "10"], "--resamples"),
    ("teacher", ["--per-clip", "0"], "--per-clip timesteps"),
    ("teacher", ["--per-clip", "1000", "1200"], "--per-clip timesteps"),
    ("teacher", ["--per-clip", "1000", "--pool", "3"], "--pool 3"),
    ("teacher", ["--pool", "2"], "--pool needs --per-clip"),
])
def test_cli_refuses_bad_input(tiny_setup: dict[str, Path], name: str, extra: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = cond.main(["--checkpoint", str(tiny_setup[name]), "--latents", str(tiny_setup["latents"]), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_vae_checkpoint_and_a_missing_dataset(tiny_setup: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from streamgen.model.vae import CausalVideoVAE

    vae_path = tmp_path / "vae.safetensors"
    save_checkpoint(CausalVideoVAE(get_preset("test").vae), vae_path, kind="vae", config=get_preset("test").vae)
    assert cond.main(["--checkpoint", str(vae_path), "--latents", str(tiny_setup["latents"])]) == 2
    assert "not a transformer" in capsys.readouterr().err
    assert cond.main(["--checkpoint", str(tiny_setup["teacher"]), "--latents", str(tmp_path / "none")]) == 2
    assert "no latent dataset" in capsys.readouterr().err
