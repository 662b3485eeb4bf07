"""Tensors: executes the scheduler's forward batches on the model, the paged cache and the VAE.

For each :class:`~streamgen.engine.scheduler.ForwardBatch` the runner stacks the chunks of
all its sessions into one ``[B, C, F, h, w]`` tensor (linear layers run over every
session's tokens at once), gives each session its own timestep row and text context row,
and lets the paged cache view run attention per session. A session's tensors (noise
generator, current chunk, prompt context, streaming VAE decoder, clean latents of the
frames still in the window) are its :class:`~streamgen.engine.session.SessionTensors`,
which the runner attaches to the session and reads through each work item's session.

Between forwards every session goes through :class:`~streamgen.engine.step.ChunkStep` with
its own generator, the step the offline generator and the trainer's rollout call, so a
session batched with others produces the frames it would produce alone.

A chunk is decoded and delivered after its last denoising step, before the forward that writes its
K/V. A stream's first chunk (without a start image, and unless it is also its last) goes out in two parts
(``early_first_frames``): its first latent frame at once, the rest in the next round, beside that cache-writing
forward. The streaming VAE decodes any split of a stream to the same frames, so only the time of the first frame
changes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from streamgen.cache.paged import PagedKVCacheManager
from streamgen.cache.paged_view import PagedCacheView
from streamgen.cache.window import is_resident
from streamgen.config import Preset
from streamgen.engine.scheduler import ForwardBatch, WorkItem, WorkKind
from streamgen.engine.session import Session, SessionTensors
from streamgen.engine.step import ChunkStep
from streamgen.model.text import TextEncoder
from streamgen.model.transformer import CausalWanTransformer, TextContext
from streamgen.model.vae import CausalVideoVAE, StreamState
from streamgen.video_io import frames_to_uint8


@dataclass(frozen=True)
class StepResult:
    item: WorkItem
    frames: np.ndarray | None   # decoded uint8 [N, H, W, 3] after a chunk's last DENOISE step or an IMAGE
    forward_ms: float           # this session's share of the batch forward
    decode_ms: float = 0.0


class ModelRunner:
    def __init__(self, preset: Preset, model: CausalWanTransformer, vae: CausalVideoVAE, text: TextEncoder,
                 kv: PagedKVCacheManager, dtype: torch.dtype, device: torch.device | str = "cpu",
                 early_first_frames: bool = True) -> None:
        self.preset = preset
        # Deliver a stream's first latent frame as soon as it is denoised (see the module docstring).
        self.early_first_frames = early_first_frames
        self.device = torch.device(device)
        self.model = model
        self.vae = vae
        self.text = text
        self.kv = kv
        self.dtype = dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.step = ChunkStep(preset.sampler, dtype, self.device)
        # Called with each finished chunk's item and clean latents [1, C, F, h, w] (an image start's
        # latent included) just before they are decoded: a seam for recording a session's latents
        # (equivalence tests, latent capture) that needs no patching of private methods.
        self.commit_listeners: list[Callable[[WorkItem, torch.Tensor], None]] = []

    # ------------------------------------------------------------------ sessions
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> TextContext:
        emb, _ = self.text.encode([prompt])
        return self.model.encode_text(emb.to(device=self.device, dtype=self.dtype))

    @torch.no_grad()
    def attach(self, session: Session, prompt: str, seed: int, image: np.ndarray | None) -> None:
        """Give ``session`` its tensors: generator, prompt context, decoder state, image latent."""
        image_latent = None
        if image is not None:
            pixels = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            image_latent = self.vae.to_diffusion(self.vae.encode_image(pixels.to(self.vae_dtype))).to(self.dtype)
        session.tensors = SessionTensors(
            generator=torch.Generator().manual_seed(seed), prompt=prompt, context=self.encode_prompt(prompt),
            decoder=self.vae.init_decoder_state(1, self.preset.latent_height, self.preset.latent_width,
                                                device=self.device, dtype=self.vae_dtype),
            image_latent=image_latent)

    # ------------------------------------------------------------------ execution
    def _latent_shape(self, num_frames: int) -> tuple[int, ...]:
        p = self.preset
        return (1, p.model.latent_channels, num_frames, p.latent_height, p.latent_width)

    @torch.no_grad()
    def execute(self, batch: ForwardBatch) -> list[StepResult]:
        if batch.kind is WorkKind.DENOISE:
            return self._denoise(batch)
        if batch.kind is WorkKind.COMMIT:
            return self._commit(batch)
        if batch.kind is WorkKind.IMAGE:
            return self._image(batch)
        return self._recache(batch)

    def _forward(self, batch: ForwardBatch, x: torch.Tensor, t: torch.Tensor, commit: bool) -> torch.Tensor:
        ids = [it.session_id for it in batch.items]
        context = TextContext.cat([it.session.state.context for it in batch.items]) if len(ids) > 1 \
            else batch.items[0].session.state.context
        view = batch.kv
        if not isinstance(view, PagedCacheView) or view.plan.commit is not commit:
            raise RuntimeError(f"a {batch.kind.value} batch for {ids} reached the runner without the cache view "
                               "its scheduler allocates")
        with view:  # the scheduler's allocation: block tables and write slots at the items' start frames
            offsets = torch.tensor(view.plan.start_frames, dtype=torch.long, device=self.device)
            return self.model(x, t, context, frame_offsets=offsets, kv_cache=view)

    def _denoise(self, batch: ForwardBatch) -> list[StepResult]:
        xs, ts = [], []
        for it in batch.items:
            st = it.session.state
            if it.step == 0:
                st.x = self.step.initial_noise(self._latent_shape(it.num_frames), st.generator)
            xs.append(st.x)
            ts.append(self.step.timesteps[it.step])
        t = torch.tensor(ts, device=self.device)[:, None].expand(len(ts), batch.num_frames)
        start = time.perf_counter()
        velocity = self._forward(batch, torch.cat(xs), t, commit=False)
        share_ms = (time.perf_counter() - start) * 1000 / len(batch.items)
        for b, it in enumerate(batch.items):
            st = it.session.state
            st.x0, st.x = self.step.advance(xs[b], velocity[b:b + 1], it.step, st.generator)
        # A chunk's last denoising step has its clean latents: decode and deliver them now; the forward that
        # writes the chunk's K/V (COMMIT) runs in the next round, after the frames went out.
        done = [it for it in batch.items if it.step == self.step.num_steps - 1]
        # One decode call per latent length: a batch may hold split first chunks beside whole chunks.
        groups: dict[int, tuple[list[WorkItem], list[torch.Tensor]]] = {}
        for it in done:
            st = it.session.state
            x0: torch.Tensor = st.x0  # type: ignore[assignment]
            self._notify(it, x0)
            if self._splits_first_chunk(it):  # the first latent frame now, the rest beside the chunk's COMMIT
                st.undecoded, x0 = x0[:, :, 1:], x0[:, :, :1]
            items, latents = groups.setdefault(x0.shape[2], ([], []))
            items.append(it)
            latents.append(x0)
        decoded = {id(r.item): r for items, latents in groups.values() for r in self._decode(items, latents, share_ms)}
        return [decoded.get(id(it)) or StepResult(it, None, share_ms) for it in batch.items]

    def _splits_first_chunk(self, item: WorkItem) -> bool:
        """Whether ``item`` (a chunk's last denoising step) delivers its first latent frame alone: a stream's
        first chunk, with more than one frame, that a COMMIT follows (a bounded stream's last chunk has none,
        so a one-chunk stream decodes whole)."""
        return (self.early_first_frames and item.start_frame == 0 and item.num_frames > 1
                and not item.session.in_last_chunk)

    def _commit(self, batch: ForwardBatch) -> list[StepResult]:
        """Write the chunk's K/V (its frames were decoded and delivered after its last denoising step, a
        stream's first chunk but for its first latent frame: those are decoded here, before the forward)."""
        rest = [it for it in batch.items if it.session.state.undecoded is not None]
        decoded = {id(r.item): r for r in self._decode(rest, [it.session.state.undecoded for it in rest], 0.0)} \
            if rest else {}
        for it in rest:
            it.session.state.undecoded = None
        clean = [it.session.state.x0 for it in batch.items]
        inputs = [self.step.commit_input(x0, it.session.state.generator)  # type: ignore[arg-type]
                  for x0, it in zip(clean, batch.items, strict=True)]
        t = torch.full((len(inputs), batch.num_frames), self.step.commit_timestep, device=self.device)
        start = time.perf_counter()
        self._forward(batch, torch.cat(inputs), t, commit=True)
        share_ms = (time.perf_counter() - start) * 1000 / len(batch.items)
        self._keep(list(batch.items), clean)  # type: ignore[arg-type]
        return [dataclasses.replace(decoded[id(it)], forward_ms=share_ms) if id(it) in decoded
                else StepResult(it, None, share_ms) for it in batch.items]

    def _image(self, batch: ForwardBatch) -> list[StepResult]:
        latents = []
        for it in batch.items:
            latent = it.session.state.image_latent
            if latent is None:
                raise RuntimeError(f"session {it.session_id!r} scheduled an image prefill without an image")
            latents.append(latent)
        t = torch.zeros(len(latents), 1, device=self.device)
        start = time.perf_counter()
        self._forward(batch, torch.cat(latents), t, commit=True)
        share_ms = (time.perf_counter() - start) * 1000 / len(batch.items)
        self._keep(list(batch.items), latents)
        for it, latent in zip(batch.items, latents, strict=True):
            self._notify(it, latent)
        return self._decode(list(batch.items), latents, share_ms)

    def _remember(self, item: WorkItem, x0: torch.Tensor) -> None:
        """Keep the clean latents of the frames still in the window (a prompt switch re-caches them)."""
        st = item.session.state
        for f in range(item.num_frames):
            st.resident[item.start_frame + f] = x0[0, :, f]
            st.chunk_of[item.start_frame + f] = st.num_chunks
        st.num_chunks += 1
        committed = item.start_frame + item.num_frames
        for frame in [j for j in st.resident if not is_resident(self.preset.cache, j, committed)]:
            del st.resident[frame]
            del st.chunk_of[frame]
        st.x = st.x0 = None

    def _keep(self, items: list[WorkItem], latents: list[torch.Tensor]) -> None:
        """Remember each committed chunk's clean latents (for a re-cache)."""
        for item, x0 in zip(items, latents, strict=True):
            self._remember(item, x0)

    def _notify(self, item: WorkItem, x0: torch.Tensor) -> None:
        """Hand a finished chunk's clean latents (all of them, once) to the commit listeners."""
        for listener in self.commit_listeners:
            listener(item, x0)

    def _decode(self, items: list[WorkItem], latents: list[torch.Tensor], forward_ms: float) -> list[StepResult]:
        """Decode the chunks in one batched streaming-VAE call (one call per session for a VAE that cannot
        batch streams, ``vae.batched_decode`` False).

        Every session keeps its own decoder state; the states are stacked for the call and split
        after it, so a session decodes exactly what it would decode alone (the decoder has no
        cross-batch ops). One call over B sessions costs well under B single calls in bf16.
        """
        states = [it.session.state.decoder for it in items]
        start = time.perf_counter()
        z = self.vae.from_diffusion(torch.cat(latents).to(self.vae_dtype))  # [B, C, F, h, w]
        if len(items) == 1:
            video, new_states = self.vae.decode_chunk(z, states[0])
            videos, parts = [video[0]], [new_states]
        elif not self.vae.batched_decode:
            # The Wan VAE: a stream's first chunk decodes to fewer frames than a later one, and its
            # feature caches change structure after the first frame, so streams decode one by one.
            decoded = [self.vae.decode_chunk(z[b:b + 1], states[b]) for b in range(len(items))]
            videos, parts = [v[0] for v, _ in decoded], [st for _, st in decoded]
        else:
            video, new_states = self.vae.decode_chunk(z, StreamState.concat(states))  # type: ignore[arg-type]
            videos, parts = list(video), new_states.split([1] * len(items))
        decode_ms = (time.perf_counter() - start) * 1000 / len(items)
        results = []
        for b, item in enumerate(items):
            item.session.state.decoder = parts[b]
            results.append(StepResult(item, frames_to_uint8(videos[b].float()), forward_ms, decode_ms))
        return results

    def _recache(self, batch: ForwardBatch) -> list[StepResult]:
        """LongLive KV re-cache: swap the prompt, rewrite the resident frames' K/V under it."""
        (item,) = batch.items
        st = item.session.state
        if st.pending_prompt is not None:
            st.prompt, st.pending_prompt = st.pending_prompt, None
            st.context = self.encode_prompt(st.prompt)
        frames = sorted(st.resident)
        if not frames:
            return [StepResult(item, None, 0.0)]
        x = torch.stack([st.resident[j] for j in frames], dim=1)[None]  # [1, C, n, h, w]
        chunk_ids = torch.tensor([st.chunk_of[j] for j in frames])
        visible = chunk_ids[None, :] <= chunk_ids[:, None]  # block-causal among the resident frames
        start = time.perf_counter()
        with self.kv.begin_rewrite(item.session_id, frames, visible) as view:
            positions = torch.tensor(frames, dtype=torch.long, device=self.device)[None]
            t = torch.full((1, len(frames)), self.preset.sampler.context_timestep, device=self.device)
            self.model(x.to(self.dtype), t, st.context, frame_offsets=positions, kv_cache=view)
        return [StepResult(item, None, (time.perf_counter() - start) * 1000)]
