"""The model through the paged cache predicts exactly what it predicts through the contiguous reference.

Several sessions with different prompts run concurrently in *one* batched forward per step
while they sit at different frame positions (they join at different times, one leaves and a
newcomer reuses its pages). Each session is mirrored by its own ``ContiguousKVCache``. Every
step does a denoising forward (nothing kept) and a committing forward at t = 0, like the
sampler, and every prediction must agree to 1e-5 in fp32 -- through hundreds of evictions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from streamgen.attention import get_backend
from streamgen.cache.contiguous import ContiguousKVCache
from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.window import frames_evicted_by_commit
from streamgen.config import CacheConfig, get_preset
from streamgen.model.transformer import CausalWanTransformer, TextContext

PRESET = get_preset("test")
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_model: Callable[..., CausalWanTransformer]) -> CausalWanTransformer:
    return tiny_model(PRESET.model)


class Mirror:
    """One session's contiguous reference: its own cache, prompt and position."""

    def __init__(self, model: CausalWanTransformer, cfg: CacheConfig) -> None:
        self.cache = ContiguousKVCache(PRESET.model.num_layers, PRESET.tokens_per_frame, cfg, get_backend("sdpa"))
        device = model.proj_out.weight.device  # drawn on the CPU, then moved: the same numbers on every device
        self.text = model.encode_text(torch.randn(1, PRESET.model.text_max_tokens, PRESET.model.text_dim).to(device))
        self.num_frames = 0


def run_step(model: CausalWanTransformer, manager: PagedKVCacheManager, mirrors: dict[str, Mirror],
             sids: list[str], chunk: int, commit: bool) -> float:
    """One batched paged forward vs. per-session contiguous forwards; returns the max abs difference."""
    shape = (len(sids), PRESET.model.latent_channels, chunk, PRESET.latent_height, PRESET.latent_width)
    device = model.proj_out.weight.device
    x = torch.randn(shape).to(device)
    t = (torch.zeros(len(sids), chunk) if commit else torch.rand(len(sids), 1).expand(-1, chunk) * 1000).to(device)
    starts = torch.tensor([mirrors[s].num_frames for s in sids], device=device)
    text = TextContext.cat([mirrors[s].text for s in sids])
    with manager.begin_forward(sids, chunk, commit=commit) as view:
        paged = model(x, t, text, frame_offsets=starts, kv_cache=view)
    worst = 0.0
    for b, sid in enumerate(sids):
        mirror = mirrors[sid]
        cview = mirror.cache.view(mirror.num_frames, chunk)
        ref = model(x[b:b + 1], t[b:b + 1], mirror.text, frame_offsets=mirror.num_frames, kv_cache=cview)
        worst = max(worst, float((paged[b:b + 1] - ref).abs().max()))
        if commit:
            mirror.cache.commit(cview)
            mirror.num_frames += chunk
            assert manager.num_committed_frames(sid) == mirror.num_frames
            assert manager.resident_frames(sid) == mirror.cache.frame_ids
    return worst


@pytest.mark.parametrize("cfg,chunk,steps,page", [
    (CacheConfig(window_frames=6, sink_frames=2), 3, 24, None),
    (CacheConfig(window_frames=5, sink_frames=0), 2, 24, None),
    (CacheConfig(window_frames=7, sink_frames=3, block_size_frames=2), 3, 20, None),  # window edges cut pages
    (CacheConfig(window_frames=None), 3, 6, None),
    # token-granular pages (4-token frames): 3-token pages cut every frame, 6-token pages every other;
    # the sinks end mid-page and the window's oldest page is partly evicted (kv_valid masks)
    (CacheConfig(window_frames=6, sink_frames=2), 3, 20, 3),
    (CacheConfig(window_frames=7, sink_frames=3), 3, 20, 6),
], ids=["w6s2", "w5s0", "w7s3-bsf2", "nowindow", "w6s2-tok3", "w7s3-tok6"])
@torch.no_grad()
def test_paged_predictions_equal_contiguous(model: CausalWanTransformer, cfg: CacheConfig, chunk: int,
                                            steps: int, page: int | None, device: torch.device) -> None:
    torch.manual_seed(1)
    model = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    manager = PagedKVCacheManager.from_preset(PRESET, get_backend("sdpa"), num_blocks=160, cache_config=cfg,
                                              block_size_tokens=page, device=device)
    worst_case = manager.worst_case_frames(chunk, total_frames=steps * chunk)
    mirrors: dict[str, Mirror] = {}
    joins = {0: ["a"], 1: ["b"], 3: ["c", "d"], steps // 2: ["e"]}  # "e" takes the pages "b" leaves
    evicted = worst = 0.0
    for step in range(steps):
        if step == steps // 2:
            manager.free("b")
            del mirrors["b"]
        for sid in joins.get(step, []):
            assert manager.admit(sid, worst_case)
            mirrors[sid] = Mirror(model, cfg)
        sids = list(mirrors)
        worst = max(worst, run_step(model, manager, mirrors, sids, chunk, commit=False))
        before = {s: mirrors[s].num_frames for s in sids}
        worst = max(worst, run_step(model, manager, mirrors, sids, chunk, commit=True))
        evicted += sum(len(frames_evicted_by_commit(cfg, before[s], mirrors[s].num_frames)) for s in sids)
    assert worst <= TOL
    if cfg.window_frames is not None:
        assert evicted >= 150, evicted
    usage = manager.usage()
    assert usage.utilisation == 1.0 or manager.block_size_tokens % PRESET.tokens_per_frame or cfg.block_size_frames > 1
    for sid in list(mirrors):
        manager.free(sid)
    assert manager.usage().used_bytes == 0


@torch.no_grad()
def test_batched_sessions_are_independent(model: CausalWanTransformer) -> None:
    """A session's predictions do not depend on which other sessions share its forward."""
    cfg = CacheConfig(window_frames=6, sink_frames=2)
    shape = (1, PRESET.model.latent_channels, 3, PRESET.latent_height, PRESET.latent_width)
    text = model.encode_text(torch.randn(1, PRESET.model.text_max_tokens, PRESET.model.text_dim))
    own_inputs = [torch.randn(shape) for _ in range(4)]  # "a"'s chunks, identical in both runs
    outs = []
    for partners in ([], ["p", "q"]):
        manager = PagedKVCacheManager.from_preset(PRESET, get_backend("sdpa"), num_blocks=64, cache_config=cfg)
        for sid in ["a", *partners]:
            manager.admit(sid, manager.worst_case_frames(3))
        for sid in partners:  # partners start ahead of "a"
            with manager.begin_forward([sid], 3, commit=True) as view:
                model(torch.randn(shape), torch.zeros(1), text, frame_offsets=0, kv_cache=view)
        steps = []
        for x in own_inputs:
            sids = ["a", *partners]
            x = torch.cat([x, torch.randn((len(partners), *shape[1:]))])
            offsets = torch.tensor([manager.num_committed_frames(s) for s in sids])
            with manager.begin_forward(sids, 3, commit=True) as view:
                steps.append(model(x, torch.zeros(len(sids)), TextContext.cat([text] * len(sids)),
                                   frame_offsets=offsets, kv_cache=view)[:1])
        outs.append(torch.cat(steps))
    torch.testing.assert_close(outs[0], outs[1], atol=TOL, rtol=0)
