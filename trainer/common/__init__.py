"""Engineering shared by every training stage: YAML configs, run checkpoints, the distributed runtime.

Submodules: ``config`` (YAML -> frozen dataclasses), ``checkpoint`` (atomic, resumable run state),
``runtime`` (accelerate, per-sample randomness, EMA, LR schedule, logging, the NaN guard, the launch
check, the shared command line), ``preflight`` (every input of a run checked before any work; ``--check``),
``latents`` (the VAE latent normalisation shared by teacher, student and serving) and ``images``
(PNG strips). Nothing is imported here, so ``import trainer.common`` has no side effects.
"""
