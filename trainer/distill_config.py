"""The Self-Forcing stage's configuration: one frozen dataclass per YAML section, and the rollout geometry.

:class:`SelfForcingConfig` is what ``python -m trainer.self_forcing --config`` parses (YAML and
``--set`` only override its fields; an unknown key is an error). Each section checks its own values;
:func:`resolve_geometry` checks what needs the teacher's horizon too. This module never loads a
model or touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamgen.config import ModelConfig, get_preset
from trainer.common.config import OptimConfig, RunConfig, check
from trainer.common.precision import EXPORT_DTYPES, PRECISIONS
from trainer.ode_init import StudentDataConfig

MODES = ("sf", "sfpp", "tf", "df")
REGRESSION_KINDS = ("latent", "lpips")


@dataclass(frozen=True)
class ModelsConfig:
    teacher: str = "checkpoints/teacher_default.safetensors"  # real score; its horizon is the default window
    student_init: str = "checkpoints/student_ode_default.safetensors"  # the ODE-init export
    critic_init: str | None = None  # fake score's initial weights; None = the teacher (Self-Forcing)
    # Smoke runs on the `test` preset only: create a random teacher (= student init), a random VAE and its
    # latent dataset at the configured paths when they are missing (see trainer.self_forcing.bootstrap_tiny).
    bootstrap: bool = False


@dataclass(frozen=True)
class RolloutConfig:
    # Rollout length N in latent frames; None = the window (sf/tf/df). sfpp needs N > window.
    num_frames: int | None = None
    # Window T the teacher and critic score; None = the teacher's horizon (checkpoint metadata).
    window_frames: int | None = None
    # sf/tf/df: only the last grad_frames frames take gradient (earlier chunks fully no_grad); None = all.
    grad_frames: int | None = None
    # sfpp: the scored window's start is drawn uniformly from the chunk-aligned starts in
    # [window_min_start, N - T]. 0 = the whole rollout (as the paper); the preset's first evicting chunk
    # (12 for `default`: trainer.rollout.first_evicting_chunk) puts the rolling cache's eviction in every window.
    window_min_start: int = 0

    def __post_init__(self) -> None:
        for name in ("num_frames", "window_frames", "grad_frames"):
            value = getattr(self, name)
            check(value is None or value > 0, f"rollout.{name} must be > 0 or null, got {value}")
        check(self.window_min_start >= 0, f"rollout.window_min_start must be >= 0, got {self.window_min_start}")


@dataclass(frozen=True)
class DMDConfig:
    cfg_scale: float = 4.0  # v_u + s (v_c - v_u); Self-Forcing's cond + 3 (cond - uncond) = 4.0
    min_t: float = 20.0  # score timestep clamp (Self-Forcing: [0.02, 0.98] x 1000)
    max_t: float = 980.0
    shift: float = 5.0
    gen_every: int = 5  # generator update every gen_every-th iteration; the critic steps every iteration

    def __post_init__(self) -> None:
        check(self.cfg_scale >= 1, f"dmd.cfg_scale must be >= 1, got {self.cfg_scale}")
        check(0 <= self.min_t < self.max_t <= 1000, f"dmd needs 0 <= min_t < max_t <= 1000, got "
              f"[{self.min_t}, {self.max_t}]")
        check(self.shift > 0, f"dmd.shift must be > 0, got {self.shift}")
        check(self.gen_every >= 1, f"dmd.gen_every must be >= 1, got {self.gen_every}")


@dataclass(frozen=True)
class CriticConfig:
    lr_mult: float = 1.0  # critic lr = optim.lr x lr_mult (two-time-scale update rule, DMD2 section 4.1)
    steps: int = 1  # critic updates per iteration; each extra one draws a fresh no-grad rollout
    grad_clip: float | None = 10.0

    def __post_init__(self) -> None:
        check(self.lr_mult > 0, f"critic.lr_mult must be > 0, got {self.lr_mult}")
        check(self.steps >= 1, f"critic.steps must be >= 1, got {self.steps}")
        check(self.grad_clip is None or self.grad_clip > 0, "critic.grad_clip must be > 0 or null")


@dataclass(frozen=True)
class ForcingConfig:
    """The baselines' ground-truth context (tf: clean; df: each frame noised to its own level)."""

    df_max_timestep: float = 1000.0  # df: context level per frame ~ U[0, df_max_timestep)

    def __post_init__(self) -> None:
        check(0 < self.df_max_timestep <= 1000, f"forcing.df_max_timestep must lie in (0, 1000], "
              f"got {self.df_max_timestep}")


@dataclass(frozen=True)
class LossesConfig:
    """Weights of the optional losses (0 = off) added to the generator's DMD loss."""

    gan: float = 0.0  # DMD2 generator GAN loss on critic features of the noised rollout
    gan_disc: float = 1.0  # discriminator loss weight inside the critic's objective (when gan > 0)
    gan_layer: int = -1  # critic block whose features the GAN head reads
    gan_hidden: int = 256
    regression: float = 0.0  # regression on teacher ODE pairs (DMD section 3.3)
    regression_kind: str = "latent"  # latent: MSE on latents; lpips: LPIPS on VAE-decoded frames (extra `lpips`)
    regression_pairs: str = "runs/ode_pairs_default"  # made by trainer.ode_init
    temporal: float = 0.0  # temporal consistency of the rollout window
    background: float = 0.0  # background preservation w.r.t. the window's first frame (border mask)
    background_border: int = 1  # latent pixels from each edge counted as background
    identity: float = 0.0  # identity preservation: critic features of each chunk vs the window's first chunk

    def __post_init__(self) -> None:
        for name in ("gan", "gan_disc", "regression", "temporal", "background", "identity"):
            check(getattr(self, name) >= 0, f"losses.{name} must be >= 0, got {getattr(self, name)}")
        check(self.gan_hidden > 0, f"losses.gan_hidden must be > 0, got {self.gan_hidden}")
        check(self.regression_kind in REGRESSION_KINDS,
              f"losses.regression_kind must be one of {REGRESSION_KINDS}, got {self.regression_kind!r}")
        check(self.background_border > 0, f"losses.background_border must be > 0, got {self.background_border}")


@dataclass(frozen=True)
class EvalConfig:
    every: int | None = None  # steps between evaluations of the EMA student (TensorBoard eval/*); None = off
    num_prompts: int = 4  # captions of the latent dataset's first clips
    num_latent_frames: int | None = None  # per clip; None = the rollout length
    classifier: str | None = "checkpoints/attr_classifier.safetensors"  # adherence; skipped if missing/None
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.every is None or self.every > 0, "eval.every must be > 0 or null")
        check(self.num_prompts > 0, f"eval.num_prompts must be > 0, got {self.num_prompts}")
        check(self.num_latent_frames is None or self.num_latent_frames > 0, "eval.num_latent_frames must be > 0")


@dataclass(frozen=True)
class SelfForcingConfig:
    mode: str = "sf"
    preset: str = "default"  # model, sampler (4 steps, chunk 3) and rolling cache come from this preset
    precision: str = "auto"  # auto: bf16 only on CPUs with native bf16 (trainer.common.precision)
    export_path: str = "checkpoints/student_sf_default.safetensors"
    export_dtype: str = "bf16"  # weights as stored (loaders upcast); bf16 halves the file, serving runs bf16
    global_batch: int = 2  # rollouts per iteration, summed over processes
    models: ModelsConfig = field(default_factory=ModelsConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="sf_default"))
    # Generator optimizer (Self-Forcing: AdamW betas (0, 0.999), constant lr, EMA of the generator).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, betas=(0.0, 0.999), weight_decay=0.0,
                                                                   warmup_steps=0, schedule="constant",
                                                                   grad_clip=10.0, ema_decay=0.99))
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: StudentDataConfig = field(default_factory=StudentDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    forcing: ForcingConfig = field(default_factory=ForcingConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        get_preset(self.preset)
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.global_batch > 0, f"global_batch must be > 0, got {self.global_batch}")
        check(self.export_dtype in EXPORT_DTYPES,
              f"export_dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")
        check(not self.models.bootstrap or self.preset == "test",
              f"models.bootstrap makes random models and is only for preset 'test', not {self.preset!r}")
        n, w = self.rollout.num_frames, self.rollout.window_frames
        if self.mode == "sfpp":
            check(n is not None, "mode sfpp needs rollout.num_frames (N, longer than the window T)")
        elif n is not None and w is not None:
            check(n == w, f"mode {self.mode} scores the whole rollout: rollout.num_frames ({n}) must equal "
                          f"rollout.window_frames ({w}) or be null")

    @property
    def model(self) -> ModelConfig:
        return get_preset(self.preset).model


@dataclass(frozen=True)
class Geometry:
    """Rollout length ``N`` and scored window ``T`` once the teacher's horizon is known."""

    num_frames: int
    window_frames: int
    teacher_horizon: int
    min_window_start: int = 0  # sfpp: earliest start of the scored window (rollout.window_min_start)


def resolve_geometry(cfg: SelfForcingConfig, horizon: int, chunk_frames: int) -> Geometry:
    """``N`` and ``T`` from config and teacher horizon; inconsistent values raise ``ValueError``."""
    window = cfg.rollout.window_frames or horizon
    check(window <= horizon, f"rollout.window_frames ({window}) exceeds the teacher's horizon ({horizon}): "
                             "the teacher would score clips longer than it was trained on")
    num = cfg.rollout.num_frames or window
    if cfg.mode == "sfpp":
        check(num > window, f"mode sfpp needs rollout.num_frames ({num}) > window ({window})")
        check(window % chunk_frames == 0, f"mode sfpp needs a chunk-aligned window: {window} frames is not a "
                                          f"multiple of the chunk ({chunk_frames})")
        first = cfg.rollout.window_min_start
        check(first % chunk_frames == 0, f"rollout.window_min_start ({first}) must be a multiple of the chunk "
                                         f"({chunk_frames})")
        check(first <= num - window, f"rollout.window_min_start ({first}) leaves no window of {window} frames in a "
                                     f"rollout of {num}: it must be <= {num - window}")
    else:
        check(num == window, f"mode {cfg.mode} scores the whole rollout: num_frames {num} != window {window}")
        check(cfg.rollout.window_min_start == 0, f"rollout.window_min_start is for mode sfpp, not {cfg.mode}")
    return Geometry(num, window, horizon, cfg.rollout.window_min_start)
