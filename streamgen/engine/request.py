"""What a client asks for and what the engine hands back, as plain dataclasses.

The gRPC layer converts protos into :class:`GenerationRequest` and :class:`ChunkOutput`
back into protos; nothing here knows about gRPC, tensors on a device, or scheduling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class FinishReason(enum.StrEnum):
    COMPLETED = "completed"        # requested frame count reached
    STOPPED = "stopped"            # the client asked to stop / cancelled
    LIMIT = "limit"                # a server limit ended an unbounded stream
    SHUTDOWN = "shutdown"          # the engine is draining
    ERROR = "error"                # see ChunkOutput.error
    REJECTED = "rejected"          # never admitted: no KV room within max_queue_wait_s (ChunkOutput.error says why)


@dataclass(frozen=True)
class GenerationRequest:
    """One stream: a prompt, a seed, how many pixel frames (``None`` = until stopped)."""

    prompt: str
    seed: int = 0
    num_frames: int | None = None
    start_image: np.ndarray | None = field(default=None, compare=False)  # uint8 [H, W, 3]
    fps: float | None = None  # playback rate used for pacing; None = the preset's fps

    def validate(self, max_prompt_chars: int, max_frames: int | None) -> None:
        """Raise ``ValueError`` with a client-facing message if the request is malformed."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(self.prompt) > max_prompt_chars:
            raise ValueError(f"prompt has {len(self.prompt)} characters; the limit is {max_prompt_chars}")
        if self.num_frames is not None:
            if self.num_frames <= 0:
                raise ValueError(f"num_frames must be > 0 (or unbounded), got {self.num_frames}")
            if max_frames is not None and self.num_frames > max_frames:
                raise ValueError(f"num_frames {self.num_frames} exceeds the limit of {max_frames}")
        if self.fps is not None and not 0 < self.fps <= 240:
            raise ValueError(f"fps must be in (0, 240], got {self.fps}")
        # The whole uint64 range of the proto's seed (see generator_seed for what the generator gets).
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


def generator_seed(seed: int) -> int:
    """The torch generator seed for a request's uint64 ``seed``.

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so seeds that differ in
    their high half alone would give the same video. Seeds below 2**32 are used as they are (their
    videos never change); a larger seed is mixed by SplitMix64's finaliser and its low 32 bits are
    used, so every bit of it counts. 2**32 distinct videos per prompt remain.
    """
    if seed < 2**32:
        return seed
    mask = 2**64 - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFF_FFFF


@dataclass(frozen=True)
class ChunkTiming:
    """Milliseconds spent on one chunk of one session."""

    generate_ms: float = 0.0  # this session's share of the transformer forwards
    decode_ms: float = 0.0
    queue_ms: float = 0.0     # admission wait (first chunk only)
    since_start_ms: float = 0.0


@dataclass(frozen=True)
class ChunkOutput:
    """Decoded frames of one chunk of one session, or the end of the session."""

    session_id: str
    first_frame_index: int
    frames: np.ndarray  # uint8 [N, H, W, 3] (N may be 0 on the final message)
    timing: ChunkTiming = ChunkTiming()
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    # The engine's session it came from (delivery looks up the session's outbox); not compared.
    session: object | None = field(default=None, compare=False, repr=False)
