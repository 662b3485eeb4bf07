"""The Python API: ``Pipeline.from_pretrained(DIR)``, ``pipe(prompt, num_frames=..., seed=...)``, ``pipe.stream``.

::

    import streamgen
    pipe = streamgen.Pipeline.from_pretrained("checkpoints/default")
    frames = pipe("a glossy red bottle turning on a white table", num_frames=48, seed=0)  # uint8 [48, H, W, 3]
    for chunk in pipe.stream("a blue mug", num_frames=96):  # chunks as they are made
        ...

No denoising loop lives here. ``__call__`` is the offline generator
(:func:`streamgen.generate.generate_latents`, contiguous KV cache) plus the VAE's streaming
decoder, the same path ``streamgen generate`` takes (it runs through :meth:`Pipeline.iter_frames`),
so equal seeds give equal frames. ``stream`` runs one session of the serving
:class:`~streamgen.engine.engine.Engine` in-process, which brings prompt switching (LongLive KV
re-cache) with it: call :meth:`PipelineStream.set_prompt` between chunks.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from streamgen.config import Preset

OUTPUT_TYPES = ("np", "pil")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or bfloat16, got {value}")
        return value
    try:
        return DTYPES[value]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}") from None


class PipelineStream:
    """An iterator over one stream's frame chunks (uint8 ``[N, H, W, 3]``), as the engine makes them.

    :meth:`set_prompt` switches the prompt from the next chunk on; :meth:`close` ends the stream
    early and frees its cache.
    """

    def __init__(self, engine: Any, session_id: str) -> None:
        self._engine = engine
        self.session_id = session_id
        self.finish_reason: str | None = None

    def __iter__(self) -> PipelineStream:
        return self

    def __next__(self) -> np.ndarray:
        while self.finish_reason is None:
            if not self._engine.has_unfinished():
                raise RuntimeError("the engine stopped without finishing the stream")
            chunk = None
            for out in self._engine.step():
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"stream failed: {out.error}")
                    self.finish_reason = str(out.finish_reason)
                if len(out.frames):
                    chunk = out.frames
            if chunk is not None:
                return chunk
        raise StopIteration

    def set_prompt(self, prompt: str) -> None:
        """Switch to ``prompt`` at the next chunk boundary (the cached frames are re-encoded under it)."""
        self._engine.update_prompt(self.session_id, prompt)

    def close(self) -> None:
        if self.finish_reason is None and self._engine.has_unfinished():
            self._engine.abort(self.session_id)
        self.finish_reason = self.finish_reason or "stopped"


class Pipeline:
    """A loaded model: preset, transformer, VAE and prompt encoder (see :meth:`from_pretrained`)."""

    def __init__(self, preset: Preset, transformer: Any, vae: Any, text: Any, *,
                 dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None,
                 description: str = "") -> None:
        if text.dim != preset.model.text_dim:
            raise ValueError(f"the prompt encoder gives {text.dim}-d embeddings but preset {preset.name} expects "
                             f"text_dim {preset.model.text_dim}"
                             + (" (a UMT5 model: use a model directory from `streamgen convert`)"
                                if preset.model.text_dim == 4096 else ""))
        self.preset = preset
        self.dtype = _dtype(dtype)
        # Where it runs: ``device``, else wherever the transformer already is.
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.transformer = transformer.eval().to(device=self.device, dtype=self.dtype)
        self.vae = vae.eval().to(self.device)
        self.text = text
        self.description = description

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str = torch.float32, attention: str = "auto",
                        text_dtype: torch.dtype | str | None = None, linear: str = "auto") -> Pipeline:
        """Load a streamgen model directory (``model.json``; see :mod:`streamgen.model_dir`).

        Args:
            path: the directory, e.g. ``checkpoints/default`` or the output of ``streamgen convert``.
            device: where the models run. The offline loop draws its noise on the CPU (so a seed
                gives the same video everywhere); only ``"cpu"`` is tested.
            dtype: transformer precision, ``float32`` or ``bfloat16``.
            attention: attention backend (``streamgen.config.ATTENTION_CHOICES``); ``auto`` picks one for
                ``device`` (``streamgen.attention.resolve_attention``).
            text_dtype: precision of a UMT5 prompt encoder (default float32).
            linear: the transformer's linear-layer kernel, as ``streamgen generate --linear``: ``auto`` (oneDNN
                prepacked weights on a CPU where they run, else ``F.linear``), ``onednn`` or ``aten``
                (:mod:`streamgen.model.prepack`); the same choice as the CLI gives the same frames. Prepacked,
                the transformer is inference-only (frozen weights, no gradients) and cannot be deep-copied;
                pass ``linear="aten"`` to fine-tune or copy it.
        """
        from streamgen.attention import resolve_attention
        from streamgen.model.compile import prepare_for_inference
        from streamgen.model.prepack import resolve_linear
        from streamgen.model_dir import load_model_dir

        attention, _ = resolve_attention(attention, device)
        kernel = resolve_linear(linear, device, dtype=_dtype(dtype)).kernel  # before any weights load
        parts = load_model_dir(path, device=device, dtype=_dtype(dtype), attention=attention,
                               text_dtype=None if text_dtype is None else _dtype(text_dtype))
        transformer = prepare_for_inference(parts.transformer.eval(), linear=kernel,
                                            rows_hint=parts.preset.chunk_tokens)
        return cls(parts.preset, transformer, parts.vae, parts.text, dtype=dtype, device=device,
                   description=parts.description)

    # ------------------------------------------------------------------ offline
    @torch.no_grad()
    def iter_frames(self, prompt: str, *, num_frames: int, seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Decoded frame chunks (uint8 ``[N, H, W, 3]``) of a ``num_frames`` video, chunk by chunk."""
        from streamgen.engine.request import generator_seed
        from streamgen.generate import generate_latents
        from streamgen.video_io import frames_to_uint8

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be an int > 0, got {num_frames!r}")
        emb, _ = self.text.encode([prompt])
        context = self.transformer.encode_text(emb.to(self.dtype))
        generator = torch.Generator().manual_seed(generator_seed(seed))  # as the engine does: equal frames
        decoder = self.vae.init_decoder_state(batch_size=1)
        vae_dtype = next(self.vae.parameters()).dtype
        written = 0
        num_latent = self.vae.latent_frames_for(num_frames)
        for latents in generate_latents(self.transformer, context, self.preset, num_latent, generator):
            video, decoder = self.vae.decode_chunk(self.vae.from_diffusion(latents.to(vae_dtype)), decoder)
            frames = frames_to_uint8(video[0].float())[: num_frames - written]
            written += len(frames)
            if progress is not None:
                progress(len(frames))
            yield frames

    def __call__(self, prompt: str, *, num_frames: int, seed: int = 0, output_type: str = "np"
                 ) -> np.ndarray | list[Any]:
        """Generate a whole video: uint8 ``[num_frames, H, W, 3]`` (``"np"``) or a list of PIL images."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        frames = np.concatenate(list(self.iter_frames(prompt, num_frames=num_frames, seed=seed)))
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(f) for f in frames]
        return frames

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt: str, *, num_frames: int | None = None, seed: int = 0) -> PipelineStream:
        """Start a stream on an in-process engine; iterate it for frame chunks, switch prompts with
        :meth:`PipelineStream.set_prompt`. ``num_frames=None`` streams until :meth:`PipelineStream.close`
        (needs a preset with a finite cache window)."""
        from streamgen.cache.paged import pages_for_frames
        from streamgen.cache.window import worst_case_resident_frames
        from streamgen.engine.engine import Engine, EngineConfig
        from streamgen.engine.request import GenerationRequest

        p = self.preset
        num_latent = None if num_frames is None else self.vae.latent_frames_for(num_frames)
        if num_latent is None and p.cache.window_frames is None:
            raise ValueError(f"preset {p.name} keeps every frame (no cache window): give num_frames")
        # A KV pool that holds exactly this one stream's worst case (+ the pool's null block).
        frames = worst_case_resident_frames(p.cache, p.sampler.chunk_frames, num_latent)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        page = p.cache.page_tokens(p.tokens_per_frame)
        blocks = pages_for_frames(p.cache, p.tokens_per_frame, page, frames) + 2
        kv_bytes = blocks * page * 2 * p.model.num_layers * p.model.dim * itemsize
        # The engine runs its VAE in the engine's dtype (in place); keep ours as it is for __call__.
        vae = self.vae if next(self.vae.parameters()).dtype == self.dtype else copy.deepcopy(self.vae)
        engine = Engine(p, self.transformer, vae, self.text,
                        EngineConfig(max_sessions=1, kv_memory_bytes=kv_bytes, max_frames=None,
                                     unbounded_max_frames=None), dtype=self.dtype, device=self.device)
        sid = engine.add_request(GenerationRequest(prompt, seed=seed, num_frames=num_frames))
        return PipelineStream(engine, sid)
