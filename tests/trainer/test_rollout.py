"""Training rollout == inference (engine and offline generator); gradient only through each chunk's exit step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from streamgen.config import CacheConfig, Preset, get_preset
from streamgen.engine.engine import Engine
from streamgen.engine.request import GenerationRequest
from streamgen.generate import generate_latents
from streamgen.model.sampler import x0_from_velocity
from streamgen.model.transformer import CausalWanTransformer
from trainer.rollout import ContextSource, last_frames_span, rollout, sample_exit_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _preset(context_timestep: float = 0.0) -> Preset:
    base = get_preset("test")
    return dataclasses.replace(base, cache=CacheConfig(window_frames=6, sink_frames=3),
                               sampler=dataclasses.replace(base.sampler, context_timestep=context_timestep))


MakeModel = Callable[..., CausalWanTransformer]  # the tiny_model / tiny_engine fixtures (tests/conftest.py)
MakeEngine = Callable[..., Engine]


def _capture_committed(engine: Engine) -> list[torch.Tensor]:
    """Record every clean chunk the engine commits (the runner's commit listeners, as in tests/engine)."""
    seen: list[torch.Tensor] = []
    engine.runner.commit_listeners.append(lambda item, x0: seen.append(x0.clone()))
    return seen


@pytest.mark.parametrize("context_timestep", [0.0, 40.0])
def test_no_grad_rollout_equals_engine_and_generate_latents(tiny_model: MakeModel, tiny_engine: MakeEngine,
                                                            context_timestep: float) -> None:
    """Exit at the last step under no_grad = inference: same latents as the paged-cache engine (batched
    serving path, its per-session generator) and as ``generate_latents``, for 10 latent frames through a
    rolling window of 6 incl. 3 sinks (so eviction happens), fp32, tolerance 1e-5."""
    preset = _preset(context_timestep)
    model = tiny_model(preset.model)
    prompt, seed, num_latent = "a glossy red bottle turning", 7, 10

    engine = tiny_engine(preset, model)
    text = engine.runner.text
    seen = _capture_committed(engine)
    engine.add_request(GenerationRequest(prompt, seed=seed, num_frames=num_latent * 4), "s")
    engine.run_until_done()
    served = torch.cat(seen, dim=2)

    emb, _ = text.encode([prompt])
    with torch.no_grad():
        context = model.encode_text(emb)
        result = rollout(model, context, preset, num_latent, torch.Generator().manual_seed(seed))
        offline = torch.cat(list(generate_latents(model, context, preset, num_latent,
                                                  torch.Generator().manual_seed(seed))), dim=2)
        per_row = rollout(model, context, preset, num_latent, [torch.Generator().manual_seed(seed)])
    assert served.shape == result.latents.shape == (1, 4, num_latent, 4, 4)
    assert (result.latents - served).abs().max() <= 1e-5
    assert (result.latents - offline).abs().max() <= 1e-5
    assert torch.equal(per_row.latents, result.latents)
    assert result.grad_chunks == []


class _Recorder(nn.Module):
    """Wraps the student: records every forward's inputs, a copy of the cache it saw, and whether it built a graph."""

    def __init__(self, model: CausalWanTransformer) -> None:
        super().__init__()
        self.model = model
        self.cfg, self.proj_out, self.backend = model.cfg, model.proj_out, model.backend
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Any, *, frame_offsets: int, kv_cache: Any
                ) -> torch.Tensor:
        cache = kv_cache.cache
        snapshot = ([None if k is None else k.clone() for k in cache.keys],
                    [None if v is None else v.clone() for v in cache.values], list(cache.frame_ids), cache.next_frame)
        out = self.model(x, t, context, frame_offsets=frame_offsets, kv_cache=kv_cache)
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "start": frame_offsets, "cache": snapshot,
                           "graph": out.grad_fn is not None})
        return out


def _replay_exit_forward(model: CausalWanTransformer, preset: Preset, call: dict[str, Any], context: Any
                         ) -> torch.Tensor:
    """The exit forward alone, with grad, against a detached copy of the cache it saw."""
    from streamgen.cache.contiguous import ContiguousKVCache

    cache = ContiguousKVCache(model.cfg.num_layers, preset.tokens_per_frame, preset.cache, model.backend)
    keys, values, frame_ids, next_frame = call["cache"]
    cache.keys, cache.values, cache.frame_ids, cache.next_frame = keys, values, frame_ids, next_frame
    x = call["x"]
    view = cache.view(call["start"], x.shape[2])
    v = model(x, call["t"], context, frame_offsets=call["start"], kv_cache=view)
    return x0_from_velocity(x, v, call["t"][0, 0].item())


@pytest.mark.parametrize("exit_step", [1, 3])
def test_gradient_flows_only_through_exit_forwards(tiny_model: MakeModel, exit_step: int) -> None:
    """Per chunk: 4 denoise forwards up to the exit step, one cache refresh. Only the exit forward of a chunk
    inside ``grad_span`` builds a graph; the loss's parameter gradient equals the sum of gradients of those
    exit forwards recomputed alone against the detached cache (so nothing leaks through the cache, the
    earlier steps or the refresh)."""
    preset = _preset(context_timestep=40.0)
    model = tiny_model(preset.model)
    recorder = _Recorder(model)
    emb = torch.randn(2, preset.model.text_max_tokens, preset.model.text_dim)
    with torch.no_grad():
        context = model.encode_text(emb)  # the text projection is held fixed here; DMD trains it too
    num_frames = 9  # 3 chunks; gradient for the last 6 frames = chunks 1 and 2
    span = last_frames_span(num_frames, 6)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    result = rollout(recorder, context, preset, num_frames, gens, exit_step=exit_step, grad_span=span)  # type: ignore[arg-type]

    per_chunk = exit_step + 1 + 1  # denoise forwards + refresh (none after the last chunk)
    assert len(recorder.calls) == 3 * per_chunk - 1
    graphs = [i for i, c in enumerate(recorder.calls) if c["graph"]]
    exit_calls = [per_chunk * n + exit_step for n in (1, 2)]
    assert graphs == exit_calls
    assert [c.start for c in result.grad_chunks] == [3, 6]
    assert [o.requires_grad for o in result.chunk_outputs] == [False, True, True]

    weights = torch.randn(result.latents.shape, generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    (result.latents * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    reference = torch.zeros(())
    for n, i in zip((1, 2), exit_calls, strict=True):
        x0 = _replay_exit_forward(model, preset, recorder.calls[i], context)
        reference = reference + (x0 * weights[:, :, 3 * n:3 * n + 3]).sum()
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_context_source_replaces_what_the_cache_holds(tiny_model: MakeModel) -> None:
    """Teacher forcing: with the ground truth written into the cache, chunk k depends on the ground truth of
    chunks < k, not on the student's own earlier chunks; the first chunk is unaffected."""
    preset = _preset()
    model = tiny_model(preset.model)
    emb = torch.randn(1, preset.model.text_max_tokens, preset.model.text_dim)
    gt = torch.randn(1, 4, 6, 4, 4)
    with torch.no_grad():
        context = model.encode_text(emb)
        own = rollout(model, context, preset, 6, torch.Generator().manual_seed(0)).latents
        forced = rollout(model, context, preset, 6, torch.Generator().manual_seed(0),
                         context_source=ContextSource(gt, torch.zeros(1, 6))).latents
        forced2 = rollout(model, context, preset, 6, torch.Generator().manual_seed(0),
                          context_source=ContextSource(gt + 1.0, torch.zeros(1, 6))).latents
    assert torch.equal(own[:, :, :3], forced[:, :, :3])
    assert (own[:, :, 3:] - forced[:, :, 3:]).abs().max() > 1e-3
    assert (forced2[:, :, 3:] - forced[:, :, 3:]).abs().max() > 1e-3


def test_exit_step_is_shared_and_reproducible() -> None:
    draws = [sample_exit_step(0, s, 4) for s in range(200)]
    assert draws == [sample_exit_step(0, s, 4) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert last_frames_span(9, None) == (0, 9) and last_frames_span(9, 6) == (3, 9)
