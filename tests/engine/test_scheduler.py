"""Scheduler alone (no tensors): pacing by a chunk's last frame, the queue deadline whatever the slot
state, typed admission decisions."""

from __future__ import annotations

from streamgen.engine.request import FinishReason
from streamgen.engine.scheduler import (
    Admission,
    AdmissionDecision,
    Scheduler,
    SchedulerConfig,
    SessionProgress,
    Status,
    WorkKind,
)

ADMIT = Admission(AdmissionDecision.ADMIT)
PIXELS_PER_LATENT = 4  # the test preset's VAE: a 3-latent-frame chunk is 12 pixel frames


def _session(sid: str, fps: float = 16.0, arrival_s: float = 0.0) -> SessionProgress:
    return SessionProgress(sid, None, worst_case_frames=6, fps=fps, pixel_frames_per_latent=PIXELS_PER_LATENT,
                           arrival_s=arrival_s)


def _run(scheduler: Scheduler, now_s: float) -> list[tuple[str, int]]:
    """One round, every forward "instant"; returns (session, first pixel frame) of each chunk started."""
    started = []
    for batch in scheduler.schedule(now_s).batches:
        for item in batch.items:
            s = scheduler.sessions[item.session_id]
            if item.kind is WorkKind.DENOISE and item.step == 0:
                started.append((item.session_id, s.emitted_pixel_frames))
            emitted = item.num_frames * PIXELS_PER_LATENT if item.kind is WorkKind.COMMIT else 0
            scheduler.update(item, emitted)
    return started


def _paced(max_lead_s: float) -> Scheduler:
    return Scheduler(SchedulerConfig(num_steps=2, chunk_frames=3, max_running=4, max_lead_s=max_lead_s),
                     lambda sid, frames: ADMIT)


def test_no_frame_is_generated_more_than_max_lead_ahead_and_playback_keeps_up() -> None:
    scheduler = _paced(max_lead_s=2.0)
    scheduler.add(_session("a"))
    chunk_starts: list[tuple[float, int]] = []
    for tick in range(1000):  # 10 s in 10 ms steps
        now = tick * 0.01
        chunk_starts += [(now, first) for _, first in _run(scheduler, now)]
    for now, first in chunk_starts:
        last_due_s = (first + 11) / 16
        assert last_due_s - now <= 2.0 + 1e-9, f"frame {first + 11} generated {last_due_s - now:.2f} s ahead"
        assert first / 16 - now >= -0.01  # and never late: each chunk is ready before its first frame plays
    assert len(chunk_starts) >= 10 * 16 // 12  # kept up with 10 s of playback


def test_chunk_longer_than_max_lead_starts_when_its_first_frame_is_due() -> None:
    # fps 1: a 12-frame chunk lasts 12 s, far more than max_lead_s = 2: it may start only once its
    # first frame is due (before: its *first* frame within max_lead, so frames 12-23 came at 10 s).
    scheduler = _paced(max_lead_s=2.0)
    scheduler.add(_session("slow", fps=1.0))
    starts = []
    for tick in range(250):
        now = tick * 0.1
        starts += [(round(now, 1), first) for _, first in _run(scheduler, now)]
    assert starts == [(0.0, 0), (12.0, 12), (24.0, 24)]


def test_queue_deadline_holds_while_every_slot_is_busy() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=1, max_queue_wait_s=1.0), lambda sid, frames: ADMIT)
    scheduler.add(_session("running"))
    scheduler.schedule(0.0)
    scheduler.add(_session("queued", arrival_s=0.0))
    scheduler.add(_session("later", arrival_s=0.6))
    assert scheduler.schedule(0.5).rejected == ()
    assert scheduler.schedule(1.0).rejected == ("queued",)
    queued = scheduler.get("queued")
    assert queued.finish_reason is FinishReason.REJECTED
    assert queued.error == "not admitted within 1 s: all 1 sessions busy"
    assert scheduler.schedule(1.6).rejected == ("later",)
    assert scheduler.get("running").status is Status.RUNNING and scheduler.num_waiting == 0


def test_admission_decisions_are_typed_never_is_refused_at_once() -> None:
    decisions = {"huge": Admission(AdmissionDecision.NEVER, "pool exhausted: more than the whole pool"),
                 "short": Admission(AdmissionDecision.WAIT, "pool exhausted: 3 of 8 blocks unreserved")}
    scheduler = Scheduler(SchedulerConfig(max_running=4, max_queue_wait_s=5.0),
                          lambda sid, frames: decisions.get(sid, ADMIT))
    scheduler.add(_session("huge"))
    out = scheduler.schedule(0.0)
    assert out.rejected == ("huge",) and scheduler.get("huge").error == "pool exhausted: more than the whole pool"
    scheduler.add(_session("short", arrival_s=0.0))
    assert scheduler.schedule(4.9).rejected == ()
    assert scheduler.schedule(5.0).rejected == ("short",)
    assert scheduler.get("short").error == "not admitted within 5 s: pool exhausted: 3 of 8 blocks unreserved"
