"""What leaves a Self-Forcing run: its result, the exported EMA student with ``report.json``, and evaluation.

:func:`export_student` writes the EMA student as a streamgen ``transformer`` checkpoint (what
``streamgen serve`` loads) with the run's metadata; :func:`evaluate_student` scores a few clips of it,
generated exactly as served, with Trainer I's suite. The export is written from CPU copies of the
weights, whatever device trained them; evaluation generates and decodes on the run's device and
hands uint8 frames to the suite. Neither trains or changes a model's weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamgen.config import Preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import save_checkpoint
from trainer.distill_config import Geometry, SelfForcingConfig
from trainer.distill_step import Batches, Models
from trainer.rollout import rollout


@dataclass
class SelfForcingResult:
    """What a :func:`trainer.distill_train.train` call did; the export's metadata and ``report.json`` come from it."""

    steps: int
    generator_steps: int
    losses: list[float] = field(default_factory=list)  # critic loss of every iteration run in this call
    generator_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    checkpoint: Path | None = None
    eval_history: list[dict[str, float]] = field(default_factory=list)


def export_student(cfg: SelfForcingConfig, preset: Preset, geom: Geometry, models: Models,
                   result: SelfForcingResult) -> None:
    """Save the EMA student as a streamgen ``transformer`` checkpoint (what ``streamgen serve`` loads)."""
    meta = {"stage": "self_forcing", "mode": cfg.mode, "preset": preset.name, "teacher": cfg.models.teacher,
            "student_init": cfg.models.student_init, "train_steps": str(result.steps),
            "generator_steps": str(result.generator_steps), "rollout_frames": str(geom.num_frames),
            "window_frames": str(geom.window_frames), "num_latent_frames": str(geom.teacher_horizon)}
    if "vae_checkpoint" in models.teacher_meta:
        meta["vae_checkpoint"] = models.teacher_meta["vae_checkpoint"]
    save_checkpoint(models.ema, cfg.export_path, kind="transformer", config=models.ema.cfg, extra_metadata=meta,
                    dtype=torch.bfloat16 if cfg.export_dtype == "bf16" else None)
    report = {"mode": cfg.mode, "steps": result.steps, "generator_steps": result.generator_steps,
              "final_critic_loss": result.losses[-1] if result.losses else None,
              "final_generator_loss": result.generator_losses[-1] if result.generator_losses else None,
              "export_path": cfg.export_path, "eval": result.eval_history}
    cfg.run.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"exported EMA student ({cfg.mode}) to {cfg.export_path}", flush=True)


@torch.no_grad()
def evaluate_student(cfg: SelfForcingConfig, preset: Preset, geom: Geometry, model: CausalWanTransformer,
                     batches: Batches) -> dict[str, float]:
    """Trainer I's suite on a few short clips of the EMA student: flag rates (and adherence with the classifier).

    Prompts are the captions of the latent dataset's first clips (their embeddings are stored, so no
    text encoder is loaded); clips are generated exactly as served, 4 steps, by the no-grad rollout that
    exits at the last step (inference by construction: ``tests/trainer/test_rollout.py`` holds it equal to
    the engine and ``generate_latents``), on ``batches.device`` where ``model`` is, and decoded there.
    """
    from streamgen.model.weights import load_vae
    from streamgen.video_io import frames_to_uint8
    from trainer.eval.suite import Video, evaluate_set

    num_latent = cfg.eval.num_latent_frames or geom.num_frames
    device = batches.device
    vae = load_vae(cfg.data.vae_checkpoint, expected=preset.vae).eval().to(device)
    classifier = None
    if cfg.eval.classifier is not None and Path(cfg.eval.classifier).is_file():
        from trainer.eval.classifier import load_classifier

        classifier = load_classifier(cfg.eval.classifier)
    videos = []
    data = batches.data
    model.eval()
    for i in range(cfg.eval.num_prompts):
        clip = i % len(data)
        emb = data.text_emb[data.caption_ids[clip]][None].to(device)
        latents = rollout(model, model.encode_text(emb), preset, num_latent,
                          torch.Generator().manual_seed(cfg.eval.seed + i)).latents
        video = vae.decode(vae.from_diffusion(latents.float()))
        videos.append(Video(f"eval_{i}", frames_to_uint8(video[0]), float(preset.video.fps), data.captions[clip]))
    result = evaluate_set(videos, classifier)
    scores = {f"flag_rate/{k}": v for k, v in result.flag_rates.items()}
    for metric, summary in result.summary_means.items():
        scores.update({f"{metric}/{k}": v for k, v in summary.items() if math.isfinite(v)})
    if result.adherence_per_head:
        scores["adherence"] = result.adherence_per_head["mean"]
    return scores
