"""One stream's state in one place: :class:`Session`.

Everything the engine knows about a stream hangs off its ``Session``: the request, the
scheduling counters and clocks (read and advanced by the scheduler), the per-stream tensors
(noise generator, prompt context, current chunk, clean latents of the frames still in the
window, the streaming VAE decoder: :class:`SessionTensors`, filled in by the model runner),
the timing counters, its KV handle and where its chunks are delivered. The scheduler keeps the
registry (``Scheduler.sessions``); work items carry a reference to their session, so the runner,
the engine and the async front end all read and write the same object instead of parallel dicts
keyed by the session id. The KV handle is the cache manager's record of the session's pages; the
scheduler reserves it at admission, allocates each step's pages and frees it (see ``Scheduler``).

A ``Session`` without tensors is valid: the scheduler's unit tests drive admission, pacing
and eviction with no model at all.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamgen.engine.request import FinishReason, GenerationRequest

if TYPE_CHECKING:  # the scheduler's side of a session needs no torch
    import torch

    from streamgen.model.transformer import TextContext


class Status(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SessionTensors:
    """A session's tensors (the model runner's part of it)."""

    generator: torch.Generator
    prompt: str
    context: TextContext                 # batch of 1
    decoder: object                      # the VAE's streaming decoder state
    image_latent: torch.Tensor | None = None  # [1, C, 1, h, w]
    pending_prompt: str | None = None
    x: torch.Tensor | None = None        # current noisy chunk [1, C, F, h, w]
    x0: torch.Tensor | None = None       # latest clean prediction
    undecoded: torch.Tensor | None = None  # the first chunk's latents after its first frame, decoded at its COMMIT
    resident: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> clean latent [C, h, w]
    chunk_of: dict[int, int] = field(default_factory=dict)          # frame -> index of its chunk
    num_chunks: int = 0


@dataclass(eq=False)
class Session:
    """One stream, from its request to its final message."""

    session_id: str
    total_latent_frames: int | None  # None = unbounded
    worst_case_frames: int           # KV frames to reserve at admission
    fps: float
    pixel_frames_per_latent: int
    arrival_s: float
    has_image: bool = False
    request: GenerationRequest | None = None
    max_pixel_frames: int | None = None  # frames to deliver at most (the request's, or the unbounded cap)
    # Scheduling (the scheduler advances these).
    status: Status = Status.WAITING
    start_s: float | None = None
    next_frame: int = 0              # first latent frame of the chunk being generated
    chunk_frames: int = 0            # its length
    step: int = 0                    # denoise step within the chunk; == num_steps -> commit
    needs_image: bool = False
    needs_recache: bool = False
    emitted_pixel_frames: int = 0    # frames delivered so far
    paused: bool = False             # backpressure: the consumer's buffer is full (see Engine.set_paused)
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Timing of the chunk in progress (ms), reported with it.
    generate_ms: float = 0.0
    queue_ms: float = 0.0            # admission wait, reported with the first chunk
    # Its KV handle while admitted (the cache's record of its pages: ``SessionBlocks`` for the paged
    # cache), set by the scheduler at admission and dropped when it finishes.
    kv: object | None = field(default=None, repr=False)
    # The model runner's tensors (None until the runner attaches them).
    tensors: SessionTensors | None = None
    # Where its chunks go (the async front end's (loop, queue)); None for a synchronous caller.
    outbox: object | None = None

    def lead_s(self, now_s: float) -> float:
        """How far the generated video runs ahead of real-time playback."""
        if self.start_s is None:
            return 0.0
        return self.emitted_pixel_frames / self.fps - (now_s - self.start_s)

    def wait_for_pacing_s(self, now_s: float, chunk_pixel_frames: int, max_lead_s: float) -> float:
        """Seconds until the next chunk may be generated (<= 0: now).

        A chunk may run once its last frame is at most ``max_lead_s`` ahead of playback, or once its
        first frame is due (a chunk longer than ``max_lead_s`` could otherwise never start on time).
        Frame ``i`` plays at ``start_s + i / fps``.
        """
        if self.start_s is None or math.isinf(max_lead_s):
            return 0.0
        elapsed = now_s - self.start_s
        first = self.emitted_pixel_frames
        last_due = (first + chunk_pixel_frames - 1) / self.fps - elapsed - max_lead_s
        first_due = first / self.fps - elapsed
        return min(last_due, first_due)

    @property
    def in_last_chunk(self) -> bool:
        """Whether the chunk in progress (``next_frame``, ``chunk_frames``) is a bounded stream's last: no later
        chunk attends to it, so no COMMIT follows its denoising steps."""
        return self.total_latent_frames is not None and self.next_frame + self.chunk_frames >= self.total_latent_frames

    @property
    def starting(self) -> bool:
        """Whether the stream's first chunk (or its start image) is not all out yet: its first latent frame may
        have gone out alone (``ModelRunner.early_first_frames``), the rest goes out with the chunk's COMMIT,
        which moves ``next_frame`` on (an image start's IMAGE forward moves it to 1)."""
        return self.next_frame == 0

    @property
    def state(self) -> SessionTensors:
        """The runner's tensors; an error if the session never got them (a scheduler-only session)."""
        if self.tensors is None:
            raise RuntimeError(f"session {self.session_id!r} has no tensors attached")
        return self.tensors
