"""``python -m trainer.self_forcing``: distil the causal few-step student with DMD on its own rollouts.

Modes (``mode:``), all with the same objective, budget and loop so they compare fairly:

* ``sf`` — **Self-Forcing** (Huang et al. 2025, arXiv 2506.08009, Alg. 1): the student rolls out
  ``N = T`` latent frames chunk by chunk with its KV cache exactly as at inference
  (:mod:`trainer.rollout`), gradient only through each chunk's exit step, and the whole rollout is
  scored by DMD against the bidirectional teacher.
* ``sfpp`` — **Self-Forcing++** (arXiv 2510.02283, section 3): the rollout runs ``N >> T`` frames
  through the *rolling* cache of the preset (window + sinks); a chunk-aligned window of the
  teacher's length ``T`` is drawn uniformly; *backward noise initialisation* re-noises the student's
  own window to the score timestep, and extended DMD scores that window only (teacher and critic
  see it at positions ``0..T-1``); only the window's chunks take gradient.
* ``tf`` — **Teacher Forcing** baseline: each chunk is denoised against a cache holding the
  *ground-truth* clean clip (the latent dataset), not the student's own chunks; same DMD.
* ``df`` — **Diffusion Forcing** baseline (CausVid-style): as ``tf``, with the ground-truth
  context noised to independent per-frame levels.

DMD (Yin et al. 2024, arXiv 2311.18828, eq. 7-8; :mod:`trainer.losses.dmd`): score timestep ``t``
uniform, shifted, clamped to ``[min_t, max_t]``; ``x_t = (1 - s) x + s e``; real ``x_0`` = teacher
with CFG, fake ``x_0`` = critic; ``g = (fake - real) / mean|x - real|``;
``L_G = 0.5 || x - sg(x - g) ||^2``. The critic (init = teacher) learns the student's distribution
by flow matching on detached rollouts every iteration; the generator steps every ``gen_every``-th
iteration (Self-Forcing: 5). AdamW betas (0, 0.999) for both; EMA of the generator (exported).
Options: DMD2's GAN head on critic features (arXiv 2405.14867) with a two-time-scale critic
(``critic.lr_mult`` / ``critic.steps``), a regression loss on teacher ODE pairs (latent MSE or
LPIPS), temporal-consistency and background/identity-preservation losses (weights default 0).

This module is the command line: it parses, checks every input (``--check`` stops there) and
dispatches. The rest lives beside it: configs and the rollout geometry in :mod:`trainer.distill_config`,
model loading and the generator/critic step (plugged into the loop all stages share,
:func:`trainer.common.runtime.run_steps`) in :mod:`trainer.distill_train`, the iteration's tensors in
:mod:`trainer.distill_step`, export and evaluation in :mod:`trainer.distill_export`, step math in
:mod:`trainer.rollout` and :mod:`trainer.losses`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.weights import read_metadata, save_checkpoint
from trainer import latent_data
from trainer.common.config import check
from trainer.common.preflight import (
    Input,
    checkpoint_command,
    file_input,
    preflight,
    run_inputs,
    stage_command,
)
from trainer.common.runtime import run_stage, stage_parser
from trainer.distill_config import Geometry, SelfForcingConfig, resolve_geometry
from trainer.distill_train import train
from trainer.ode_init import check_latents_spec, student_data_inputs, teacher_horizon


# ---------------------------------------------------------------- smoke-run assets
def bootstrap_tiny(cfg: SelfForcingConfig, horizon: int = 6, seed: int = 0) -> None:
    """Create what a ``test``-preset smoke run needs, where the config points, if it is missing.

    A random VAE with unit latent stats, a latent dataset of rendered clips encoded by it (prompts
    embedded with the model-free hash encoder), and a random teacher whose metadata records the
    horizon (``data.num_latent_frames`` or ``horizon``) and is also the student init. Nothing here
    is trained: it exercises every code path in seconds, it does not make a useful model.
    """
    import shutil

    from streamgen.model.text import HashTokenEncoder
    from streamgen.model.vae import CausalVideoVAE
    from trainer.common.latents import LatentStats

    preset = get_preset(cfg.preset)
    check(preset.name == "test", "bootstrap_tiny is only for the 'test' preset")
    frames = cfg.data.num_latent_frames or horizon
    vae_path, teacher_path = Path(cfg.data.vae_checkpoint), Path(cfg.models.teacher)
    if not vae_path.is_file():
        torch.manual_seed(seed)
        channels = preset.vae.latent_channels
        save_checkpoint(CausalVideoVAE(preset.vae), vae_path, kind="vae", config=preset.vae,
                        extra_metadata=LatentStats((0.0,) * channels, (1.0,) * channels).metadata())
    latent_data.build(Path(cfg.data.latents_dir), cfg.data.spec(preset, frames), batch=4, log=False,
                      token_encoder=HashTokenEncoder())
    if not teacher_path.is_file():
        torch.manual_seed(seed)
        teacher = CausalWanTransformer(preset.model)
        with torch.no_grad():  # a zero output head would predict zero velocity everywhere
            for p in teacher.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_checkpoint(teacher, teacher_path, kind="transformer", config=preset.model,
                        extra_metadata={"num_latent_frames": str(frames), "vae_checkpoint": str(vae_path),
                                        "preset": preset.name, "stage": "bootstrap (random)"})
    for path in (cfg.models.student_init, cfg.models.critic_init):
        if path is not None and not Path(path).is_file():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(teacher_path, path)


# ---------------------------------------------------------------- CLI
def check_setup(cfg: SelfForcingConfig) -> Geometry:
    """Every check that needs only checkpoint metadata/headers: run it before any work (also in ``main``)."""
    preset = get_preset(cfg.preset)
    for what, path in (("teacher", cfg.models.teacher), ("student_init", cfg.models.student_init),
                       ("critic_init", cfg.models.critic_init or cfg.models.teacher)):
        if not Path(path).is_file():
            raise ValueError(f"models.{what} checkpoint {path} does not exist")
        read_metadata(path)
    horizon = teacher_horizon(cfg.models.teacher)
    geom = resolve_geometry(cfg, horizon, preset.sampler.chunk_frames)
    check_latents_spec(Path(cfg.data.latents_dir), cfg.data.spec(preset, horizon))
    if cfg.losses.regression > 0 and not (Path(cfg.losses.regression_pairs) / "manifest.json").is_file():
        raise ValueError(f"losses.regression > 0 needs ODE pairs in {cfg.losses.regression_pairs} "
                         "(make them with python -m trainer.ode_init --pairs-only)")
    return geom


def inputs(cfg: SelfForcingConfig, args: argparse.Namespace) -> list[Input]:
    """What a run reads: ``--check`` lists it, and a missing required input stops the run before any work."""
    preset = get_preset(cfg.preset)
    m = cfg.models
    found = [file_input("models.teacher", m.teacher, checkpoint_command("trainer.teacher", m.teacher)),
             file_input("models.student_init", m.student_init, checkpoint_command("trainer.ode_init", m.student_init))]
    if m.critic_init is not None:
        found.append(file_input("models.critic_init", m.critic_init,
                                checkpoint_command("trainer.teacher", m.critic_init)))
    horizon = teacher_horizon(m.teacher) if found[0].present else None
    found += student_data_inputs(cfg.data, preset, horizon)
    decodes = cfg.eval.every is not None or (cfg.losses.regression > 0 and cfg.losses.regression_kind == "lpips")
    if decodes and not any(i.key == "data.vae_checkpoint" for i in found):
        found.append(file_input("data.vae_checkpoint", cfg.data.vae_checkpoint,
                                checkpoint_command("trainer.vae", cfg.data.vae_checkpoint)))
    if cfg.losses.regression > 0:
        pairs = Path(cfg.losses.regression_pairs)
        found.append(Input("losses.regression_pairs", pairs, (pairs / "manifest.json").is_file(),
                           "make the teacher's ODE pairs with " + stage_command(
                               "trainer.ode_init", "configs/ode_init_default.yaml",
                               {"teacher": m.teacher, "pairs.dir": pairs}, "--pairs-only")))
    if cfg.eval.every is not None and cfg.eval.classifier is not None:
        found.append(file_input("eval.classifier", cfg.eval.classifier,
                                checkpoint_command("trainer.eval.classifier", cfg.eval.classifier),
                                optional="evaluation reports no prompt adherence"))
    return found + run_inputs(cfg.run, args.resume)


def build_parser() -> argparse.ArgumentParser:
    p = stage_parser(
        SelfForcingConfig, prog="python -m trainer.self_forcing",
        description="Distil the causal 4-step student with DMD against the bidirectional teacher, on its own "
                    "KV-cache rollouts (mode sf: Self-Forcing; sfpp: Self-Forcing++ long rollouts scored in "
                    "teacher-length windows) or on ground-truth context (tf: Teacher Forcing; df: Diffusion "
                    "Forcing baselines). --resume restores student, critic, both optimizers, EMA and RNG. "
                    "Exports the EMA student as a 'transformer' checkpoint. Run dir: <run.runs_dir>/<run.name>/ "
                    "(checkpoints/, tb/, report.json).",
        no_export_help="train only; skip the export")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run(cfg: SelfForcingConfig) -> None:
        if cfg.models.bootstrap:
            bootstrap_tiny(cfg)
        preflight(inputs(cfg, args), check=args.check)  # every missing input, with the command that makes it
        geom = check_setup(cfg)  # every mismatch is refused here, before models are built
        if args.check:
            print(json.dumps({"mode": cfg.mode, "rollout_frames": geom.num_frames,
                              "window_frames": geom.window_frames, "teacher_horizon": geom.teacher_horizon}))
        else:
            train(cfg, resume=args.resume, export=not args.no_export)

    return run_stage(SelfForcingConfig, args, run)


if __name__ == "__main__":
    sys.exit(main())
