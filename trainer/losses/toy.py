"""DMD's 2-D toy (Yin et al. 2024, arXiv 2311.18828, Figure 3): mode seeking vs. regression.

Target: a mixture of two isotropic Gaussians in 2-D. Under our flow-matching noising
``x_t = (1 - s) x_0 + s e`` every component stays Gaussian, ``x_t | k ~ N((1 - s) mu_k, v_s I)``
with ``v_s = (1 - s)^2 sigma^2 + s^2``, so the real score, the x_0 prediction and the
probability-flow velocity are exact closed forms (:class:`GaussianMixture2D`).

A small MLP generator ``z -> x``, initialised as a blob beside the ``(+2, 0)`` mode, is trained
with the DMD gradient of :mod:`trainer.losses.dmd`: the real x_0 from the exact mixture, the fake
x_0 from a small critic trained online by flow matching on detached generator samples, two critic
updates per generator update (the video trainer's recipe, :func:`~trainer.losses.dmd.critic_flow_loss`).
A learned critic rather than a closed-form Gaussian fit of the generator: the generator becomes
bimodal, where a Gaussian fit is wrong exactly where it matters. What it shows
(``tests/trainer/losses/test_toy.py``):

* DMD with score timesteps in ``[20, 350]`` moves the blob onto the target, mean and spread, but
  only onto the nearer mode (reverse KL is mode seeking: at these noise levels the far mode is
  all but invisible); with the regression loss on (noise, exact-ODE output) pairs
  (:func:`~trainer.losses.regression.regression_loss`) it covers both. This is DMD's Figure 3.
* With DMD's full range ``[20, 980]`` the high-noise levels do see the far mode: at a generator
  sitting exactly on one mode the exact DMD gradient is ~0 for ``s < 0.5`` but 1.2-1.8
  (normalised units) towards the far mode for ``s > 0.5``, so here DMD alone covers both modes
  too, as long as the critic tracks the generator (DMD2's case, arXiv 2405.14867, for dropping
  the regression loss).
* The critic must keep up: with one critic update per generator update the generator folds
  (right mode, wrong shape), and with a generator learning rate of 2e-3 the ``[20, 350]`` run
  leaks a filament of samples towards the far mode after ~600 updates; with the defaults (two
  critic updates, 1e-3) it stays a clean blob on one mode for at least 1000 updates.

``python -m trainer.losses.toy OUT.png`` runs these and prints the coverage. Seconds on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.losses.dmd import critic_flow_loss, dmd_gradient, dmd_loss, sample_score_timesteps
from trainer.losses.regression import regression_loss


@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-variance isotropic Gaussian mixture ``sum_k w_k N(mu_k, sigma^2 I)`` in 2-D, exact under noising."""

    means: tuple[tuple[float, float], ...] = ((-2.0, 0.0), (2.0, 0.0))
    std: float = 0.3
    weights: tuple[float, ...] = (0.5, 0.5)

    def __post_init__(self) -> None:
        if len(self.means) != len(self.weights) or not self.means:
            raise ValueError("means and weights must be non-empty and of equal length")
        if self.std <= 0 or min(self.weights) <= 0:
            raise ValueError("std and weights must be positive")

    def mean_tensor(self) -> torch.Tensor:
        return torch.tensor(self.means, dtype=torch.float32)  # [K, 2]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, 2]`` samples of the clean mixture."""
        k = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        return self.mean_tensor()[k] + self.std * torch.randn(n, 2, generator=generator)

    def _components(self, x_t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log-density ``[N, K]``, offsets ``delta_k = x_t - (1 - s) mu_k`` ``[N, K, 2]``, ``v_s``."""
        s = torch.as_tensor(s, dtype=torch.float32).expand(x_t.shape[0])[:, None, None]  # [N, 1, 1]
        var = (1 - s).square() * self.std**2 + s.square()
        delta = x_t[:, None, :] - (1 - s) * self.mean_tensor()[None]  # [N, K, 2]
        log_w = torch.tensor(self.weights).log() - math.log(sum(self.weights))
        log_p = log_w[None] - delta.square().sum(-1) / (2 * var[..., 0]) - torch.log(2 * math.pi * var[..., 0])
        return log_p, delta, var  # [N, K], [N, K, 2], [N, 1, 1]

    def log_density(self, x_t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """``[N]`` log p_s(x_t) of the noised mixture at level ``s`` (``[N]`` or scalar)."""
        return torch.logsumexp(self._components(x_t, torch.as_tensor(s))[0], dim=1)

    def velocity(self, x_t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """Exact flow-matching velocity ``E[e - x_0 | x_t]`` ``[N, 2]``, finite for all ``s`` in ``[0, 1]``.

        Per component ``(x_t - E[x_0 | x_t, k]) / s = delta_k (s - (1 - s) sigma^2) / v_s - mu_k``
        (the ``1 / s`` cancels), mixed with the posterior responsibilities.
        """
        log_p, delta, var = self._components(x_t, torch.as_tensor(s))
        s_ = torch.as_tensor(s, dtype=torch.float32).expand(x_t.shape[0])[:, None, None]
        per_k = delta * (s_ - (1 - s_) * self.std**2) / var - self.mean_tensor()[None]  # [N, K, 2]
        return (log_p.softmax(dim=1)[..., None] * per_k).sum(dim=1)

    def x0_prediction(self, x_t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """Exact ``E[x_0 | x_t] = x_t - s v`` ``[N, 2]`` (the real denoiser of DMD)."""
        s_ = torch.as_tensor(s, dtype=torch.float32).expand(x_t.shape[0])[:, None]
        return x_t - s_ * self.velocity(x_t, s)


def ode_pairs(mixture: GaussianMixture2D, z: torch.Tensor, num_steps: int = 64) -> torch.Tensor:
    """Integrate the exact probability-flow ODE ``dx/ds = v(x, s)`` from noise ``z`` (s = 1) to s = 0 (RK4).

    The map pushes ``N(0, I)`` onto the mixture; ``(z, ode_pairs(z))`` are DMD's regression pairs.
    """
    x, ds = z.float(), -1.0 / num_steps
    for i in range(num_steps):
        s = 1.0 + i * ds
        k1 = mixture.velocity(x, s)
        k2 = mixture.velocity(x + 0.5 * ds * k1, s + 0.5 * ds)
        k3 = mixture.velocity(x + 0.5 * ds * k2, s + 0.5 * ds)
        k4 = mixture.velocity(x + ds * k3, s + ds)
        x = x + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class ToyGenerator(nn.Module):
    """``z [N, 2] -> x [N, 2]``: an affine map (initially ``center + scale * z``) plus a zero-initialised MLP."""

    def __init__(self, center: tuple[float, float], scale: float, hidden: int) -> None:
        super().__init__()
        self.affine = nn.Linear(2, 2)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        with torch.no_grad():
            self.affine.weight.copy_(scale * torch.eye(2))
            self.affine.bias.copy_(torch.tensor(center))
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.affine(z) + self.mlp(z)


class ToyCritic(nn.Module):
    """The fake score: velocity ``v(x_t, s)`` ``[N, 2]`` from ``x_t [N, 2]`` and Fourier features of ``s [N]``."""

    def __init__(self, hidden: int, num_freqs: int = 4) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, num_freqs + 1, dtype=torch.float32), persistent=False)
        self.net = nn.Sequential(nn.Linear(3 + 2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        angles = s[:, None] * self.freqs[None]
        return self.net(torch.cat([x_t, s[:, None], angles.sin(), angles.cos()], dim=1))


@dataclass(frozen=True)
class ToyConfig:
    mixture: GaussianMixture2D = field(default_factory=GaussianMixture2D)
    init_center: tuple[float, float] = (1.6, 1.0)  # above and left of the (+2, 0) mode
    init_scale: float = 0.5
    seed: int = 0
    num_steps: int = 200  # generator updates
    critic_steps: int = 2  # critic updates per generator update (two time scales, DMD2): the critic must keep up
    critic_warmup_steps: int = 100  # fit the critic to the initial generator before the first generator update
    batch: int = 256
    hidden_generator: int = 64
    hidden_critic: int = 64
    lr_generator: float = 1e-3
    lr_critic: float = 2e-3
    score_shift: float = 1.0  # no warp in 2-D: uniform score timesteps in [min_t, max_t]
    score_min_t: float = 20.0
    score_max_t: float = 980.0
    regression: bool = False
    regression_weight: float = 0.25  # DMD's lambda_reg
    num_pairs: int = 1024
    ode_steps: int = 64
    num_eval: int = 4096
    eval_every: int = 50  # record coverage every this many generator updates (ToyResult.history)

    def __post_init__(self) -> None:
        for name in ("num_steps", "critic_steps", "critic_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ToyConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch", "hidden_generator", "hidden_critic", "num_pairs", "ode_steps", "num_eval", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ToyConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.score_min_t <= self.score_max_t <= 1000.0:
            raise ValueError(f"need 0 <= score_min_t <= score_max_t <= 1000, got "
                             f"{self.score_min_t}, {self.score_max_t}")


@dataclass(frozen=True)
class ToyResult:
    initial: torch.Tensor  # [num_eval, 2] generator samples before training
    final: torch.Tensor  # [num_eval, 2] after
    target: torch.Tensor  # [num_eval, 2] mixture samples
    coverage: list[float]  # fraction of final samples nearest to each mode
    on_mode: list[float]  # fraction of final samples within 3 std of each mode (the target puts 98.9% there)
    mean_distance: float  # final samples' mean distance to their nearest mode
    initial_mean_distance: float
    history: list[tuple[int, list[float], float]]  # (generator updates, coverage, mean distance) along the run
    seconds: float


def on_mode_fractions(x: torch.Tensor, means: torch.Tensor, radius: float) -> list[float]:
    """Fraction of samples ``x [N, 2]`` within ``radius`` of each mode ``means [K, 2]`` (on a mode, not between)."""
    return (torch.cdist(x, means) < radius).float().mean(dim=0).tolist()


def mode_coverage(x: torch.Tensor, means: torch.Tensor) -> tuple[list[float], float]:
    """Fraction of samples ``x [N, 2]`` nearest to each mode ``means [K, 2]`` and their mean distance to it."""
    dist = torch.cdist(x, means)  # [N, K]
    nearest = dist.argmin(dim=1)
    fractions = torch.bincount(nearest, minlength=means.shape[0]).float() / x.shape[0]
    return fractions.tolist(), float(dist.min(dim=1).values.mean())


def train_toy(cfg: ToyConfig) -> ToyResult:
    """Train the toy generator with DMD (+ regression if ``cfg.regression``); deterministic given ``cfg.seed``."""
    start = time.perf_counter()
    mixture = cfg.mixture
    rng = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: keep the caller's intact
        torch.manual_seed(cfg.seed)
        gen = ToyGenerator(cfg.init_center, cfg.init_scale, cfg.hidden_generator)
        critic = ToyCritic(cfg.hidden_critic)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator, betas=(0.0, 0.999))
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic, betas=(0.0, 0.999))
    z_eval = torch.randn(cfg.num_eval, 2, generator=rng)
    with torch.no_grad():
        initial = gen(z_eval)
    z_pairs = torch.randn(cfg.num_pairs, 2, generator=rng)
    x_pairs = ode_pairs(mixture, z_pairs, cfg.ode_steps)  # DMD's (noise, teacher output) pairs

    def score_levels() -> torch.Tensor:
        return sample_score_timesteps(cfg.batch, rng, shift=cfg.score_shift, min_t=cfg.score_min_t,
                                      max_t=cfg.score_max_t) / 1000.0  # s = t / T, [B]

    def critic_step() -> None:
        with torch.no_grad():
            x0 = gen(torch.randn(cfg.batch, 2, generator=rng))
        noise = torch.randn(cfg.batch, 2, generator=rng)
        s = torch.rand(cfg.batch, generator=rng)
        x_t = (1 - s[:, None]) * x0 + s[:, None] * noise
        loss = critic_flow_loss(critic(x_t, s), x0, noise)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    for _ in range(cfg.critic_warmup_steps):
        critic_step()
    means = mixture.mean_tensor()
    history: list[tuple[int, list[float], float]] = []
    for step in range(1, cfg.num_steps + 1):
        for _ in range(cfg.critic_steps):
            critic_step()
        x = gen(torch.randn(cfg.batch, 2, generator=rng))
        s = score_levels()
        with torch.no_grad():
            x_t = (1 - s[:, None]) * x + s[:, None] * torch.randn(cfg.batch, 2, generator=rng)
            real_x0 = mixture.x0_prediction(x_t, s)
            fake_x0 = x_t - s[:, None] * critic(x_t, s)
        loss = dmd_loss(x, dmd_gradient(x, real_x0, fake_x0))
        if cfg.regression:
            idx = torch.randint(cfg.num_pairs, (cfg.batch,), generator=rng)
            loss = loss + cfg.regression_weight * regression_loss(gen(z_pairs[idx]), x_pairs[idx])
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if step % cfg.eval_every == 0 or step == cfg.num_steps:
            with torch.no_grad():
                history.append((step, *mode_coverage(gen(z_eval), means)))

    with torch.no_grad():
        final = gen(z_eval)
    coverage, mean_distance = mode_coverage(final, means)
    return ToyResult(initial=initial, final=final, target=mixture.sample(cfg.num_eval, rng), coverage=coverage,
                     on_mode=on_mode_fractions(final, means, 3 * mixture.std), mean_distance=mean_distance,
                     initial_mean_distance=mode_coverage(initial, means)[1], history=history,
                     seconds=time.perf_counter() - start)


def plot(results: dict[str, ToyResult], path: Path) -> None:
    """Scatter the target, the initial generator and each run's final samples into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    panels = [("target (mixture)", first.target), ("generator at init", first.initial)]
    for name, r in results.items():
        panels.append((f"{name}\ncoverage {', '.join(f'{c:.0%}' for c in r.coverage)}", r.final))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, panels, strict=True):
        ax.scatter(first.target[:, 0], first.target[:, 1], s=1, c="0.85")
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: The demo's runs: name -> overrides of :class:`ToyConfig`.
RUNS: dict[str, dict[str, Any]] = {
    "DMD, t in [20, 350]": {"score_max_t": 350.0},
    "DMD + regression, t in [20, 350]": {"score_max_t": 350.0, "regression": True},
    "DMD, t in [20, 980]": {},
    "DMD + regression, t in [20, 980]": {"regression": True},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.losses.toy", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("png", type=Path, help="where to write the scatter plot (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600,
                        help="generator updates per run (the test uses 200; bimodal runs sharpen with more)")
    args = parser.parse_args(argv)
    base = ToyConfig(seed=args.seed, num_steps=args.steps)
    results = {name: train_toy(replace(base, **overrides)) for name, overrides in RUNS.items()}
    for name, r in results.items():
        modes = ", ".join(f"{m}: {c:.1%} ({o:.1%} within 3 std)"
                          for m, c, o in zip(base.mixture.means, r.coverage, r.on_mode, strict=True))
        print(f"{name:33s} nearest mode {modes}; mean distance to nearest mode {r.initial_mean_distance:.3f} -> "
              f"{r.mean_distance:.3f} ({r.seconds:.1f} s)")
    plot(results, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
