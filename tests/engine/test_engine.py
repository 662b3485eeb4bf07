"""Engine: batched == alone == offline, prompt switch (KV re-cache), image start, bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from streamgen.config import Preset, get_preset
from streamgen.engine.engine import Engine
from streamgen.engine.request import FinishReason, GenerationRequest
from streamgen.generate import generate_latents
from streamgen.model.masks import frame_visibility

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _preset() -> Preset:
    import dataclasses

    from streamgen.config import CacheConfig

    base = get_preset("test")
    return dataclasses.replace(base, cache=CacheConfig(window_frames=6, sink_frames=3))


MakeEngine = Callable[..., Engine]  # the tiny_engine fixture (tests/conftest.py)


def _capture_latents(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Record every committed clean chunk per session (through the runner's commit listeners)."""
    seen: dict[str, list[torch.Tensor]] = {}
    engine.runner.commit_listeners.append(
        lambda item, x0: seen.setdefault(item.session_id, []).append(x0.clone()))
    return seen


def test_batched_equals_alone_equals_offline(tiny_engine: MakeEngine, device: torch.device) -> None:
    preset = _preset()
    target = GenerationRequest("a glossy red bottle", seed=7, num_frames=8 * 4)

    alone = tiny_engine(preset, device=device)
    alone_latents = _capture_latents(alone)
    sid = alone.add_request(target, "target")
    alone_frames = np.concatenate([c.frames for c in alone.run_until_done()[sid]])

    batched = tiny_engine(preset, device=device)
    batched_latents = _capture_latents(batched)
    batched.add_request(GenerationRequest("a blue mug", seed=1, num_frames=60), "early")
    for _ in range(7):  # the others start earlier: different steps and context lengths
        batched.step()
    batched.add_request(GenerationRequest("a green can turning", seed=2, num_frames=40), "mid")
    batched.step()
    batched.step()
    batched.add_request(target, "target")
    batched.add_request(GenerationRequest("a white box", seed=3, num_frames=8), "late")
    outputs = batched.run_until_done()

    a = torch.cat(alone_latents[sid], dim=2)
    b = torch.cat(batched_latents["target"], dim=2)
    assert a.shape == (1, 4, 8, 4, 4)
    assert (a - b).abs().max() <= 1e-4
    frames = np.concatenate([c.frames for c in outputs["target"]])
    assert frames.shape == (32, 32, 32, 3)
    # Decoded in one VAE call with the other sessions' chunks: the same pixels as alone.
    assert np.abs(frames.astype(int) - alone_frames.astype(int)).max() <= 1
    assert frames.std() > 1  # not a constant image
    assert outputs["target"][-1].finish_reason is FinishReason.COMPLETED

    # The offline reference: contiguous cache, same seed, same weights.
    model = alone.model
    emb, _ = alone.runner.text.encode([target.prompt])
    reference = torch.cat(list(generate_latents(model, model.encode_text(emb.to(device)), preset, 8,
                                                torch.Generator().manual_seed(7))), dim=2)
    assert (a - reference).abs().max() <= 1e-4
    assert batched.kv.usage().num_used_blocks == 0


def test_first_latent_frame_goes_out_before_the_rest_of_its_chunk(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    request = GenerationRequest("a glossy red bottle", seed=3, num_frames=9 * 4)  # 3 chunks of 3 latent frames
    frames, latents, timeline = {}, {}, {}
    for early in (True, False):
        engine = tiny_engine(preset, early_first_frames=early)
        latents[early] = _capture_latents(engine)
        engine.add_request(request, "s")
        outputs: list[np.ndarray] = []
        timeline[early] = []
        step = 0
        while engine.has_unfinished():
            step += 1
            for c in engine.step():
                if len(c.frames):
                    timeline[early].append((step, c.first_frame_index, len(c.frames)))
                    outputs.append(c.frames)
        frames[early] = np.concatenate(outputs)
    # Whole: chunk 0 after its 4th denoising forward (step 4), the COMMIT in step 5, chunk 1's 4 steps, ...
    assert timeline[False] == [(4, 0, 12), (9, 12, 12), (14, 24, 12)]
    # Early: the first latent frame's 4 frames in the same step, the other 8 beside the COMMIT one step later.
    assert timeline[True] == [(4, 0, 4), (5, 4, 8), (9, 12, 12), (14, 24, 12)]
    # The same frames (the streaming decoder decodes any split alike) and the same whole chunks' latents.
    assert np.abs(frames[True].astype(int) - frames[False].astype(int)).max() <= 1
    assert frames[True].std() > 1
    assert [x.shape[2] for x in latents[True]["s"]] == [3, 3, 3]
    assert all(torch.equal(a, b) for a, b in zip(latents[True]["s"], latents[False]["s"], strict=True))


@pytest.mark.parametrize("first_chunk_first", [True, False])
def test_split_and_whole_chunks_finish_in_one_batch(tiny_engine: MakeEngine, first_chunk_first: bool) -> None:
    """A one-chunk stream (never split) and a longer one start together: their last denoising steps share a
    batch, one decoding three latent frames and the other one; each gets the frames it gets alone."""
    preset = _preset()
    requests = {"short": GenerationRequest("a white box", seed=1, num_frames=12),
                "long": GenerationRequest("a red mug", seed=2, num_frames=36)}
    alone = {}
    for name, request in requests.items():
        engine = tiny_engine(preset)
        engine.add_request(request, name)
        alone[name] = np.concatenate([c.frames for c in engine.run_until_done()[name]])
    engine = tiny_engine(preset, first_chunk_first=first_chunk_first)
    for name, request in requests.items():
        engine.add_request(request, name)
    outputs = engine.run_until_done()
    for name in requests:
        assert outputs[name][-1].finish_reason is FinishReason.COMPLETED, outputs[name][-1].error
        assert [len(c.frames) for c in outputs[name]][:2] == ([12, 0] if name == "short" else [4, 8])
        together = np.concatenate([c.frames for c in outputs[name]])
        assert np.abs(together.astype(int) - alone[name].astype(int)).max() <= 1


def test_a_new_stream_gets_the_rest_of_its_first_chunk_before_older_streams_run(tiny_engine: MakeEngine) -> None:
    """With first_chunk_first, a stream whose first latent frame went out alone still counts as new until the
    rest of its first chunk is out: another new stream does not hold it at 4 frames."""
    preset = _preset()
    engine = tiny_engine(preset, first_chunk_first=True)
    engine.add_request(GenerationRequest("a blue mug", seed=1, num_frames=60), "old")
    while engine.sessions["old"].emitted_pixel_frames < 12:
        engine.step()
    engine.add_request(GenerationRequest("a red mug", seed=2, num_frames=36), "a")
    engine.step()
    engine.step()
    engine.add_request(GenerationRequest("a green can", seed=3, num_frames=36), "b")
    parts: dict[str, list[tuple[int, int]]] = {"a": [], "b": [], "old": []}
    for step in range(1, 9):
        for c in engine.step():
            if len(c.frames):
                parts[c.session_id].append((step, len(c.frames)))
    # a: step 2 of its first chunk done before b arrived; its last two steps, then the rest beside its COMMIT.
    assert parts["a"][:2] == [(2, 4), (3, 8)]
    assert parts["b"][:2] == [(4, 4), (5, 8)]
    assert all(step > 5 for step, _ in parts["old"])  # the older stream waited for both


def test_a_one_chunk_stream_is_delivered_whole(tiny_engine: MakeEngine) -> None:
    """No COMMIT follows a bounded stream's last chunk, so its only chunk is not split."""
    engine = tiny_engine(_preset())
    engine.add_request(GenerationRequest("a white box", seed=1, num_frames=12), "one")
    outputs = engine.run_until_done()["one"]
    assert [(c.first_frame_index, len(c.frames)) for c in outputs] == [(0, 12), (12, 0)]
    assert outputs[-1].finish_reason is FinishReason.COMPLETED


class _Capture:
    """A SelfAttentionCache that records each layer's keys and attends under a frame mask."""

    def __init__(self, backend, mask: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
        self.backend, self.mask, self.keys = backend, mask, {}

    def attend(self, layer_idx, q, k, v):  # type: ignore[no-untyped-def]
        self.keys[layer_idx] = k.clone()
        return self.backend.attention(q, k, v, self.mask)


def _stored_keys(engine: Engine, sid: str, frame: int, layer: int) -> torch.Tensor:
    block, offset = engine.kv.frame_location(sid, frame)
    k_pool, _ = engine.kv.pool.layer(layer)
    return k_pool[block, offset:offset + engine.preset.tokens_per_frame]


def test_prompt_switch_recaches_resident_frames_and_continues(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    engine = tiny_engine(preset)
    latents = _capture_latents(engine)
    sid = engine.add_request(GenerationRequest("a red bottle", seed=4, num_frames=4 * 18), "s")
    while sum(x.shape[2] for x in latents.get(sid, [])) < 12:  # four chunks delivered
        engine.step()
    engine.step()  # the fourth chunk's commit forward (its frames went out first)
    before = _stored_keys(engine, sid, 11, 1).clone()  # layer 0 keys do not depend on the prompt
    engine.update_prompt(sid, "a blue mug on a wooden table")
    engine.step()  # at the chunk boundary: the re-cache forward

    resident = engine.kv.resident_frames(sid)
    assert resident == [0, 1, 2, 9, 10, 11]
    clean = torch.cat(latents[sid], dim=2)[:, :, resident]
    tpf = preset.tokens_per_frame
    chunk_ids = torch.tensor([j // 3 for j in resident])
    mask = (chunk_ids[None] <= chunk_ids[:, None]).repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
    capture = _Capture(engine.model.backend, mask)
    emb, _ = engine.runner.text.encode(["a blue mug on a wooden table"])
    with torch.no_grad():
        engine.model(clean, torch.zeros(1, len(resident)), engine.model.encode_text(emb),
                     frame_offsets=torch.tensor([resident]), kv_cache=capture)
    for layer in range(preset.model.num_layers):
        for i, frame in enumerate(resident):
            expected = capture.keys[layer][0, i * tpf:(i + 1) * tpf]
            assert (_stored_keys(engine, sid, frame, layer) - expected).abs().max() <= 1e-5
    assert (_stored_keys(engine, sid, 11, 1) - before).abs().max() > 1e-3  # it really changed
    outputs = engine.run_until_done()
    assert outputs[sid][-1].finish_reason is FinishReason.COMPLETED
    assert sum(len(c.frames) for c in outputs[sid]) == 4 * 18 - 48


def test_image_start_writes_image_latent_as_clean_frame_zero(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    engine = tiny_engine(preset)
    channels = preset.vae.latent_channels
    # Non-trivial latent normalisation: the cache must hold the *normalised* image latent and the
    # decoder must see it mapped back, as with a trained VAE.
    engine.vae.set_latent_stats([0.3 * c - 0.5 for c in range(channels)], [0.5 + 0.25 * c for c in range(channels)])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sid = engine.add_request(GenerationRequest("a jar", seed=5, num_frames=20, start_image=image), "img")
    first = engine.step()
    assert [(c.first_frame_index, len(c.frames)) for c in first] == [(0, 4)]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    raw = engine.vae.encode_image(pixels)
    latent = engine.vae.to_diffusion(raw)
    assert (latent - raw).abs().max() > 0.1  # the stats do change the latent
    decoded, _ = engine.vae.decode_chunk(raw, engine.vae.init_decoder_state(batch_size=1))
    expected_frames = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    assert np.abs(first[0].frames.astype(int) - expected_frames.astype(int)).max() <= 1
    capture = _Capture(engine.model.backend, None)
    with torch.no_grad():
        engine.model(latent, torch.zeros(1, 1), engine.sessions[sid].state.context, frame_offsets=0,
                     kv_cache=capture)
    assert (_stored_keys(engine, sid, 0, 1) - capture.keys[1][0]).abs().max() <= 1e-5
    rest = engine.run_until_done()[sid]
    assert [(c.first_frame_index, len(c.frames)) for c in rest[:-1]] == [(4, 12), (16, 4)]
    assert rest[-1].finish_reason is FinishReason.COMPLETED


def test_bad_input_is_rejected_and_others_keep_streaming(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    engine = tiny_engine(preset, max_prompt_chars=40, max_frames=100)
    good = engine.add_request(GenerationRequest("a can", seed=1, num_frames=24), "good")
    bad = [
        (GenerationRequest(""), "non-empty"),
        (GenerationRequest("x" * 41), "limit is 40"),
        (GenerationRequest("a can", num_frames=0), "num_frames must be > 0"),
        (GenerationRequest("a can", num_frames=101), "exceeds the limit of 100"),
        (GenerationRequest("a can", start_image=np.zeros((16, 16, 3), np.uint8)), r"\(32, 32, 3\)"),
        (GenerationRequest("a can", start_image=np.zeros((32, 32, 4), np.uint8)), "uint8 RGB"),
    ]
    for request, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(request)
    with pytest.raises(KeyError, match="unknown session"):
        engine.update_prompt("nope", "a mug")
    with pytest.raises(ValueError, match="non-empty"):
        engine.update_prompt(good, " ")
    with pytest.raises(ValueError, match="limit is 40"):
        engine.update_prompt(good, "y" * 41)
    out = engine.run_until_done()
    assert sum(len(c.frames) for c in out[good]) == 24


def test_pool_exhausted_queues_then_rejects_with_reason(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    now = [0.0]
    engine = tiny_engine(preset, max_queue_wait_s=5.0)
    engine.clock = lambda: now[0]
    engine.scheduler.sessions.clear()
    # Shrink the pool so exactly one session fits.
    from streamgen.cache.paged import PagedKVCacheManager
    from streamgen.engine.engine import PagedKVSpace

    per_session = engine.kv.blocks_for_frames(engine.kv.worst_case_frames(3, None))
    engine.kv = PagedKVCacheManager.from_preset(preset, engine.model.backend, num_blocks=per_session + 1,
                                                dtype=torch.float32)
    engine.runner.kv = engine.kv
    engine.scheduler.kv = PagedKVSpace(engine.kv)
    first = engine.add_request(GenerationRequest("a can", seed=1), "first")  # unbounded
    second = engine.add_request(GenerationRequest("a mug", seed=2, num_frames=12), "second")
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    now[0] = 6.0
    ended = [c for c in engine.step() if c.finished]
    assert [(c.session_id, c.finish_reason) for c in ended] == [(second, FinishReason.REJECTED)]
    assert "pool exhausted" in (ended[0].error or "")
    final = engine.abort(first)
    assert final is not None and final.finish_reason is FinishReason.STOPPED
    assert engine.kv.usage().num_used_blocks == 0 and not engine.has_unfinished()


def test_window_visibility_matches_rolling_policy() -> None:
    """The engine's window (6 incl. 3 sinks) is the one the offline mask describes."""
    vis = frame_visibility(12, 3, 6, 3)
    assert vis[9].nonzero().flatten().tolist() == [0, 1, 2, 9, 10, 11]


def test_warm_up_runs_a_whole_stream_and_leaves_the_engine_as_it_was(tiny_engine: MakeEngine) -> None:
    preset = _preset()
    request = GenerationRequest("a matte blue mug", seed=4, num_frames=6 * 4)
    cold = tiny_engine(preset)
    cold.add_request(request, "s")
    expected = np.concatenate([c.frames for c in cold.run_until_done()["s"]])

    engine = tiny_engine(preset)
    kinds: list[str] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch: kinds.append(batch.kind.value) or execute(batch)  # type: ignore[method-assign]
    assert engine.warm_up(chunks=2) > 0
    # Chunk 0's 4 denoising forwards and its cache write, then chunk 1's 4 (a bounded stream's last chunk is
    # not committed): every kind of forward a stream without a start image runs.
    assert kinds == ["denoise"] * 4 + ["commit"] + ["denoise"] * 4
    assert not engine.has_unfinished() and not engine.sessions and engine.kv.usage().num_used_blocks == 0

    def paged_calls() -> int:
        usage = engine.kv.usage()
        return usage.paged_direct_calls + usage.paged_gathered_calls + usage.paged_split_calls

    assert paged_calls() == 0  # the counters (metrics, benchmarks) count served streams only
    engine.add_request(request, "s")
    frames = np.concatenate([c.frames for c in engine.run_until_done()["s"]])
    assert np.array_equal(frames, expected)  # a warmed engine makes the very same frames
    assert paged_calls() > 0
    # A server whose frame limit is below two chunks still warms up (one chunk, cut to the limit).
    assert tiny_engine(preset, max_frames=8).warm_up() > 0

    engine.add_request(request, "busy")
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.warm_up()
    with pytest.raises(ValueError, match="at least 1 chunk"):
        tiny_engine(preset).warm_up(chunks=0)
    # A KV pool that cannot hold the warm-up stream: a RuntimeError that says so, and the engine stays idle.
    small = tiny_engine(preset, kv_memory_bytes=2**12)
    with pytest.raises(RuntimeError, match="REJECTED|rejected") as refused:
        small.warm_up()
    assert "fewer warm-up chunks" in str(refused.value)
    assert not small.sessions and small.kv.usage().num_used_blocks == 0
