"""ModelConfig.frame_embeddings: each frame's absolute position, embedded like a timestep and mapped by a
learned linear layer onto its time embedding. Zero at init (a checkpoint without it predicts exactly as
before), read at every position the forward is given (streaming chunks, re-cached frames), shared past the
last position, and carried by a checkpoint as its own layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from streamgen.attention import get_backend
from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.config import CacheConfig, ModelConfig, get_preset
from streamgen.model.masks import block_causal_mask
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import load_transformer, save_checkpoint
from tests.conftest import seeded_tiny_model

BASE = get_preset("test").model
TABLE = 8
FRAMED = dataclasses.replace(BASE, frame_embeddings=TABLE)


def _framed_model(perturb: bool = True) -> tuple[CausalWanTransformer, CausalWanTransformer]:
    """(the seeded tiny model, the same weights in a model with frame embeddings, perturbed unless not)."""
    plain = seeded_tiny_model(BASE, seed=0)
    framed = CausalWanTransformer(FRAMED).eval()
    missing, unexpected = framed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["condition_embedder.frame_embedding.bias",
                               "condition_embedder.frame_embedding.weight"] and not unexpected
    if perturb:
        with torch.no_grad():
            framed.condition_embedder.frame_embedding.weight.normal_(0.0, 0.5)
    return plain, framed


def _inputs(model: CausalWanTransformer, frames: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, BASE.latent_channels, frames, 4, 4, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    ctx = model.encode_text(torch.randn(batch, BASE.text_max_tokens, BASE.text_dim, generator=g))
    return x, t, ctx


def test_zero_frame_embeddings_predict_exactly_as_the_model_without_them() -> None:
    plain, framed = _framed_model(perturb=False)
    fresh = CausalWanTransformer(FRAMED).condition_embedder.frame_embedding  # the init
    assert not fresh.weight.any() and not fresh.bias.any()
    x, t, ctx = _inputs(plain, 6)
    with torch.no_grad():
        for offset in (0, 3, 50):
            assert torch.equal(plain(x, t, ctx, frame_offsets=offset), framed(x, t, ctx, frame_offsets=offset))


def test_the_output_depends_on_the_absolute_position_up_to_the_last_embedding() -> None:
    _, framed = _framed_model()
    x, t, ctx = _inputs(framed, 3)
    with torch.no_grad():
        out = {offset: framed(x, t, ctx, frame_offsets=offset) for offset in (0, 4, TABLE, TABLE + 30)}
    assert (out[0] - out[4]).abs().max() > 1e-2  # RoPE alone would make these equal (relative positions)
    # Every position at or past the table's end reads its last embedding: only RoPE's rounding differs.
    assert (out[TABLE] - out[TABLE + 30]).abs().max() <= 1e-4
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])  # explicit positions, as a re-cache passes them
    with torch.no_grad():
        explicit = framed(x, t, ctx, frame_offsets=positions)
    assert (explicit[0] - out[4][0]).abs().max() <= 1e-5 and (explicit[1] - out[0][1]).abs().max() <= 1e-5


@pytest.mark.parametrize("num_frames, chunk, window, sink", [(12, 3, None, 0), (15, 3, 6, 3)])
def test_chunked_cache_equals_the_masked_sequence_with_frame_embeddings(num_frames: int, chunk: int,
                                                                        window: int | None, sink: int) -> None:
    _, framed = _framed_model()
    x, t, ctx = _inputs(framed, num_frames)
    policy = CacheConfig(window_frames=window, sink_frames=sink)
    mask = block_causal_mask(num_frames, 4, chunk, window, sink)
    cache = ContiguousKVCache(FRAMED.num_layers, 4, policy, get_backend("sdpa"))
    outs = []
    with torch.no_grad():
        reference = framed(x, t, ctx, attn_mask=mask)
        for start in range(0, num_frames, chunk):
            view = cache.view(start, chunk)
            outs.append(framed(x[:, :, start:start + chunk], t[:, start:start + chunk], ctx, frame_offsets=start,
                               kv_cache=view))
            cache.commit(view)
    assert (torch.cat(outs, dim=2) - reference).abs().max() <= 1e-4


def test_a_checkpoint_carries_its_frame_embeddings_as_its_own_layout(tmp_path: Path) -> None:
    _, framed = _framed_model()
    path = tmp_path / "framed.safetensors"
    save_checkpoint(framed, path, kind="transformer", config=FRAMED)
    loaded = load_transformer(path, expected=BASE)  # the preset's config: any frame-embedding count serves it
    assert loaded.cfg.frame_embeddings == TABLE
    torch.testing.assert_close(loaded.condition_embedder.frame_embedding.weight,
                               framed.condition_embedder.frame_embedding.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_layers"):
        load_transformer(path, expected=dataclasses.replace(BASE, num_layers=BASE.num_layers + 1))


def test_a_model_with_frame_embeddings_needs_positions_and_a_valid_count() -> None:
    _, framed = _framed_model()
    with pytest.raises(ValueError, match="absolute position"):
        framed.condition_embedder.time(torch.zeros(1, 2), torch.float32)
    with pytest.raises(ValueError, match="frame_embeddings must be >= 0"):
        ModelConfig(**{**dataclasses.asdict(BASE), "frame_embeddings": -1})


def test_the_teacher_starts_a_frame_embedding_run_from_a_checkpoint_without_them(tmp_path: Path) -> None:
    from trainer.teacher import load_init

    plain, framed = _framed_model()
    plain_path, framed_path = tmp_path / "plain.safetensors", tmp_path / "framed.safetensors"
    save_checkpoint(plain, plain_path, kind="transformer", config=BASE)
    save_checkpoint(framed, framed_path, kind="transformer", config=FRAMED)
    fresh = CausalWanTransformer(FRAMED).eval()
    load_init(fresh, str(plain_path))
    x, t, ctx = _inputs(plain, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx, frame_offsets=5), plain(x, t, ctx, frame_offsets=5))
    other = CausalWanTransformer(dataclasses.replace(BASE, frame_embeddings=TABLE + 1))
    with pytest.raises(ValueError, match="has 8 frame embeddings, the config asks for 9"):
        load_init(other, str(framed_path))
