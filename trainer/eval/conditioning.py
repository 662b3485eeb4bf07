"""``python -m trainer.eval.conditioning``: how much of each caption attribute's effect a teacher has learnt.

The attribute classifier reads generated clips, so a low reading cannot say whether the generator ignores a
word or renders it in a way the classifier misreads, and it needs the whole sampler. This instrument asks the
denoiser directly, at the one noise level where the right answer is known exactly: at ``t = 1000`` the input
is pure noise, independent of the clip, so the ideal (MSE-optimal) prediction of ``x_0`` given a caption is the
mean clip of that caption. Averaged over the clips that share an attribute value, the model's predictions
should therefore reproduce the data's group means for that value.

For one attribute with values ``v`` (groups of ``n_v`` clips out of ``N``), clips ``X_i`` (latent crops) and
predictions ``P_i`` (the teacher's ``x_0`` at ``t = 1000`` from clip ``i``'s caption and its own noise):

* the data's between-group variance ``B_xx = sum_v pi_v |mu_v - mu|^2`` (``pi_v = n_v / N``) is estimated from
  pairs of *distinct* clips only: ``|mu_v|^2`` as the mean of ``<X_i, X_j>`` over ordered pairs ``i != j`` in
  group ``v``, ``<mu_v, mu_u>`` over pairs across groups. The plug-in ``|mean_v X - mean X|^2`` would pair
  each clip with itself and be biased upwards by the within-group scatter (a finite group's mean is noisy);
* the same estimate of the cross products ``B_px`` (``<P_i, X_j>``, ``i != j``) also leaves out the one pair
  that shares a caption, ``<P_i, X_i>``, through which another attribute of the caption would leak into a
  group's effect when the group's composition is unbalanced;
* **share** = ``B_px / B_xx``: the slope of the model's group effects on the data's.
  1 = the model moves its mean clip by the attribute as the data do; 0 = it ignores the word; between, the
  part of the effect it has learnt (a model whose effect has another shape gets only its projection).

Each attribute is read three ways: **total**; **static**, the clips' mean over frames (where and how large
the product is, its colour, the background); **temporal**, each frame minus that mean (how the clip changes
from frame to frame: the camera move itself, the product's turning). The parts are orthogonal. Intervals are
95 % percentile bootstraps over clips (resampled with replacement, seeded); a part whose corrected data
effect is not above 0 in the bootstrap is **unreadable** (the data give no reference there) and gets no
share.

The clips are the teacher's own training latents (a latent dataset of ``trainer.teacher``): this measures
what the teacher learnt of its training distribution, not generalisation. Only a denoiser trained over the
whole noise range (a ``trainer.teacher`` export) has the mean clip as its ``t = 1000`` answer; a distilled
student's first step does not, and is refused.

    python -m trainer.eval.conditioning --checkpoint checkpoints/teacher_colour_h12.safetensors \\
        --latents runs/latents_colour_h12_10s_1024 --out runs/conditioning_teacher.json

``--per-clip T ...`` reads clips one by one instead of attribute groups: the share of each clip's own static
and temporal part (slope over all clips, bootstrap over clips) in the model's ``x_0`` from that clip noised to
each timestep ``T``. At ``T = 1000`` the clip is gone and only its caption speaks -- for a model fine-tuned on
exactly these clips under distinct captions, the memorised clip is the answer, so it tells whether the model
*can* make a clip's frames differ by caption at all; below 1000, how much of the clip the denoiser recovers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data.attributes import ATTRIBUTE_KEYS
from trainer.eval.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, bootstrap

PARTS = ("total", "static", "temporal")
MIN_PER_GROUP = 2  # a value needs two clips for a within-group scatter


@dataclass(frozen=True)
class Grams:
    """Inner products between clips: ``xx[i, j] = <X_i, X_j>``, ``px[i, j] = <P_i, X_j>`` (``[N, N]`` float64)."""

    xx: np.ndarray
    px: np.ndarray

    def __post_init__(self) -> None:
        if self.xx.ndim != 2 or self.xx.shape[0] != self.xx.shape[1] or self.px.shape != self.xx.shape:
            raise ValueError(f"Grams need two [N, N] matrices, got {self.xx.shape} and {self.px.shape}")


def grams(data: torch.Tensor, predictions: torch.Tensor) -> dict[str, Grams]:
    """Gram matrices of the three parts for clips ``data`` and predictions ``predictions`` (``[N, C, F, H, W]``)."""
    if data.shape != predictions.shape or data.ndim != 5:
        raise ValueError(f"data and predictions must both be [N, C, F, H, W], got {tuple(data.shape)} and "
                         f"{tuple(predictions.shape)}")
    x, p = data.double(), predictions.double()
    frames = x.shape[2]
    parts = {
        "total": (x, p),
        # the frame mean broadcast over the frames: its inner products are F x those of the means
        "static": (x.mean(dim=2) * frames ** 0.5, p.mean(dim=2) * frames ** 0.5),
        "temporal": (x - x.mean(dim=2, keepdim=True), p - p.mean(dim=2, keepdim=True)),
    }
    out = {}
    for name, (a, b) in parts.items():
        a, b = a.flatten(1), b.flatten(1)
        out[name] = Grams(xx=(a @ a.T).numpy(), px=(b @ a.T).numpy())
    return out


def _group_index(labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    values = sorted(set(labels))
    if len(values) < 2:
        raise ValueError(f"the attribute takes one value ({values}) in these clips: no effect to measure")
    groups = np.array([values.index(v) for v in labels])
    counts = np.bincount(groups, minlength=len(values))
    if counts.min() < MIN_PER_GROUP:
        small = [f"{values[k]} ({counts[k]})" for k in range(len(values)) if counts[k] < MIN_PER_GROUP]
        raise ValueError(f"every value needs >= {MIN_PER_GROUP} clips, got {', '.join(small)}: measure more clips")
    return values, groups


def _between(sums: np.ndarray, self_pairs: np.ndarray, n_v: np.ndarray, pairs: np.ndarray) -> float:
    """Unbiased ``sum_v pi_v <a_v, b_v> - <sum_v pi_v a_v, sum_u pi_u b_u>`` from pairs of distinct clips.

    ``sums[v, u]`` is the weighted sum of ``<A_i, B_j>`` over ``i`` in group ``v`` and ``j`` in ``u``;
    ``a_v``/``b_v`` are the expected A/B of group ``v``, ``pi_v`` its share of the clips. Group ``v``'s own
    term averages over ordered pairs ``i != j`` inside the group (``self_pairs`` and ``pairs`` remove the
    same-clip pairs), the cross terms over pairs in different groups, so no clip is ever paired with itself:
    that pair would put the clip's own scatter into the estimate (biased upwards) and, for ``<P_i, X_i>``, the
    effect of every other attribute of its caption. Bootstrap copies of one clip are one clip (their pairs are
    left out too), as in :func:`trainer.eval.stats.kid`.
    """
    inner = sums / np.outer(n_v, n_v)
    np.fill_diagonal(inner, (np.diag(sums) - self_pairs) / pairs)
    pi = n_v / n_v.sum()
    return float(pi @ np.diag(inner) - pi @ inner @ pi)


def _statistics(gram: Grams, blocks: list[slice], indicator: np.ndarray,
                weights: np.ndarray) -> tuple[list[tuple[float, float]], float]:
    """Per attribute ``(between of px, between of xx)`` and the clips' variance, under clip ``weights``."""
    ind = indicator * weights[None, :]  # [sum K, N]
    n_all, w2 = weights.sum(), weights ** 2
    out = []
    sums = {name: ind @ g @ ind.T for name, g in (("px", gram.px), ("xx", gram.xx))}
    self_pairs = {name: (indicator * w2[None, :]) @ np.diag(g) for name, g in (("px", gram.px), ("xx", gram.xx))}
    n_v_all = ind.sum(axis=1)
    pairs_all = n_v_all ** 2 - (indicator * w2[None, :]).sum(axis=1)
    for block in blocks:
        out.append(tuple(_between(sums[name][block, block], self_pairs[name][block], n_v_all[block],
                                  pairs_all[block]) for name in ("px", "xx")))
    diag = np.diag(gram.xx)
    cross = (weights @ gram.xx @ weights - w2 @ diag) / (n_all ** 2 - w2.sum())
    return out, float(weights @ diag / n_all - cross)  # type: ignore[return-value]


def measure(parts: dict[str, Grams], attributes: Sequence[dict[str, str]], keys: Sequence[str] = ATTRIBUTE_KEYS,
            num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
            level: float = DEFAULT_LEVEL) -> dict[str, dict[str, Any]]:
    """Share of each attribute's data effect that the predictions reproduce, per part (:data:`PARTS`).

    Returns ``{attribute: {part: {"share": Interval | None, "data_effect": Interval, "readable": bool}}}`` for
    every attribute in ``keys`` that takes >= 2 values in the clips. ``data_effect`` is the data's
    between-group variance over their whole variance in that part (how much of the clips the attribute
    explains: the reference's own size); ``share`` is None where that effect is not above 0 in the bootstrap.
    One set of clip resamples serves every attribute and part.
    """
    n = len(attributes)
    for part in PARTS:
        if parts[part].xx.shape[0] != n:
            raise ValueError(f"{n} clips' attributes for {parts[part].xx.shape[0]} clips")
    used, blocks, rows = [], [], []
    for key in keys:
        if any(key not in a for a in attributes):
            continue  # an attribute these clips do not record
        labels = [a[key] for a in attributes]
        if len(set(labels)) < 2:
            continue
        values, groups = _group_index(labels)
        blocks.append(slice(len(rows), len(rows) + len(values)))
        rows += [groups == v for v in range(len(values))]
        used.append((key, groups))
    if not used:
        raise ValueError("no attribute takes two values in these clips")
    indicator = np.stack(rows).astype(np.float64)  # [sum K, N]
    rng = np.random.default_rng(seed)
    draws = [np.ones(n)]
    attempts = 0
    while len(draws) < num_resamples + 1:
        attempts += 1
        if attempts > 3 * num_resamples + 100:  # rare values: most resamples would lose them
            rare = {key: int(np.bincount(g).min()) for key, g in used}
            raise ValueError(f"too few clips per value for a bootstrap (smallest group per attribute: {rare}): "
                             "measure more clips")
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        if all(np.bincount(g, weights=(w > 0).astype(np.float64)).min() >= MIN_PER_GROUP for _, g in used):
            draws.append(w)  # a group of fewer than two distinct clips has no pair inside it: drawn again
    tail = (1.0 - level) / 2.0
    out: dict[str, dict[str, Any]] = {key: {} for key, _ in used}
    for part in PARTS:
        per_draw = [_statistics(parts[part], blocks, indicator, w) for w in draws]
        for a, (key, _) in enumerate(used):
            bxy, bxx = per_draw[0][0][a]
            shares = np.array([s[a][0] / s[a][1] if s[a][1] > 0 else np.nan for s, _ in per_draw[1:]])
            effects = np.array([s[a][1] / var for s, var in per_draw[1:]])
            data_effect = Interval(bxx / per_draw[0][1], float(np.quantile(effects, tail)),
                                   float(np.quantile(effects, 1 - tail)), n, level)
            readable = bool(bxx > 0 and data_effect.low > 0)
            share = None
            if readable:
                finite = shares[np.isfinite(shares)]
                share = Interval(bxy / bxx, float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail)),
                                 n, level)
            out[key][part] = {"share": share, "data_effect": data_effect, "readable": readable}
    return out


# ------------------------------------------------------------------------------------------------- model


def check_teacher(checkpoint: Path, dataset_vae: str) -> int | None:
    """The checkpoint's recorded horizon (latent frames; None if it records none); ``ValueError`` for anything
    but a teacher of that latent space."""
    from streamgen.model.weights import read_metadata

    if not checkpoint.is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    meta = read_metadata(checkpoint)
    if meta.get("kind") != "transformer":
        raise ValueError(f"{checkpoint} is a {meta.get('kind', 'unknown')!r} checkpoint, not a transformer")
    if "stage" in meta:
        raise ValueError(f"{checkpoint} is a distilled student (stage {meta['stage']!r}): its prediction from pure "
                         "noise is not the mean clip; pass a trainer.teacher export")
    if meta.get("vae_checkpoint") != dataset_vae:
        raise ValueError(f"{checkpoint} was trained in the latent space of {meta.get('vae_checkpoint')!r}, the "
                         f"latent dataset is of {dataset_vae!r}: the clips and predictions would not compare")
    return int(meta["num_latent_frames"]) if "num_latent_frames" in meta else None


def predict_mean_clips(model: torch.nn.Module, text_emb: torch.Tensor, shape: Sequence[int], seed: int,
                       start: int = 0, batch: int = 8, progress: bool = True) -> torch.Tensor:
    """The model's ``x_0`` at ``t = 1000`` for each caption embedding (``[N, L, D]``), from seeded noise
    (clip ``i`` draws from seed ``seed + i``, so a subset or another batch size gives the same predictions),
    for crops whose first frame is ``start`` latent frames into the clip (what frame embeddings read)."""
    return predict_x0(model, text_emb, shape, seed, start=start, batch=batch, progress=progress)


def predict_x0(model: torch.nn.Module, text_emb: torch.Tensor, shape: Sequence[int], seed: int, start: int = 0,
               batch: int = 8, progress: bool = True, clips: torch.Tensor | None = None,
               timestep: float = 1000.0) -> torch.Tensor:
    """The model's ``x_0`` for each caption embedding from ``x_t = (1 - s) clip + s noise`` at ``timestep``
    (``s = t / 1000``; clip ``i``'s noise from seed ``seed + i``); at ``t = 1000`` the input is the noise alone
    and ``clips`` may be None."""
    from tqdm import tqdm

    from streamgen.model.sampler import add_noise, x0_from_velocity

    if clips is None and timestep != 1000.0:
        raise ValueError(f"a prediction at t = {timestep} needs the clips it noises")
    out = []
    bar = tqdm(total=len(text_emb), desc=f"teacher at t={timestep:g}", unit="clip", disable=not progress,
               mininterval=2.0)
    for first in range(0, len(text_emb), batch):
        emb = text_emb[first:first + batch]
        noise = torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + first + j))
                             for j in range(len(emb))])
        t = torch.full((len(emb),), float(timestep))
        x_t = noise if clips is None else add_noise(clips[first:first + batch].float(), noise, t)
        with torch.no_grad():
            v = model(x_t, t, model.encode_text(emb), frame_offsets=start)
        out.append(x0_from_velocity(x_t, v, t).float())
        bar.update(len(emb))
    bar.close()
    return torch.cat(out)


def per_clip_shares(data: torch.Tensor, predictions: torch.Tensor, num_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict[str, Interval]:
    """How much of each clip's *own* static and temporal part a prediction reproduces: the slope
    ``sum_i <P_i, X_i> / sum_i |X_i|^2`` per part, with a bootstrap interval over clips. Static: the frame mean
    about the set's mean clip (the prediction about its own set mean); temporal: each frame minus the frame
    mean. At ``t = 1000`` a model trained on exactly these clips under distinct captions can reach 1 by
    memorising them; a model that cannot make a clip's frames differ reads 0 on the temporal part."""
    if data.shape != predictions.shape or data.ndim != 5:
        raise ValueError(f"data and predictions must both be [N, C, F, H, W], got {tuple(data.shape)} and "
                         f"{tuple(predictions.shape)}")
    if len(data) < 2:
        raise ValueError(f"per-clip shares need >= 2 clips, got {len(data)}")
    x, p = data.double(), predictions.double()
    xs, ps = x.mean(dim=2), p.mean(dim=2)
    parts = {"static": (xs - xs.mean(dim=0), ps - ps.mean(dim=0)),
             "temporal": (x - x.mean(dim=2, keepdim=True), p - p.mean(dim=2, keepdim=True))}
    out = {}
    for name, (a, b) in parts.items():
        a, b = a.flatten(1), b.flatten(1)
        num, den = (a * b).sum(dim=1).numpy(), (a * a).sum(dim=1).numpy()
        if den.sum() <= 0:
            raise ValueError(f"the clips have no {name} part to compare with")
        out[name] = bootstrap(lambda idx, num=num, den=den: num[idx].sum() / max(den[idx].sum(), 1e-300),
                              len(data), num_resamples=num_resamples, seed=seed)
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| attribute | total: share [95 %] | static | temporal | data: % of the clips' variance, "
             "total / static / temporal |", "|---|---|---|---|---|"]
    for key, parts in results.items():
        cells = []
        for part in PARTS:
            r = parts[part]
            cells.append(r["share"].format(2) if r["readable"] else "unreadable")
        effects = " / ".join(f"{100 * parts[p]['data_effect'].value:.2f}" for p in PARTS)
        lines.append(f"| {key} | {' | '.join(cells)} | {effects} |")
    return "\n".join(lines)


def spatial_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, C, F, H, W]`` averaged over ``k x k`` latent pixels (``H`` and ``W`` must be multiples of ``k``)."""
    if k < 1 or x.shape[-1] % k or x.shape[-2] % k:
        raise ValueError(f"--pool {k} must be >= 1 and divide the latent size {tuple(x.shape[-2:])}")
    n, c, f, h, w = x.shape
    return x.reshape(n, c, f, h // k, k, w // k, k).mean(dim=(4, 6))


def per_clip_table(results: dict[str, dict[str, Interval]]) -> str:
    lines = ["| t | static: share of each clip's own [95 %] | temporal |", "|---|---|---|"]
    lines += [f"| {t} | {parts['static'].format(2)} | {parts['temporal'].format(2)} |" for t, parts in results.items()]
    return "\n".join(lines)


def _jsonable(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {key: {part: {"share": None if r["share"] is None else r["share"].as_dict(),
                         "data_effect": r["data_effect"].as_dict(), "readable": r["readable"]}
                  for part, r in parts.items()} for key, parts in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.eval.conditioning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a trainer.teacher export")
    p.add_argument("--latents", type=Path, required=True,
                   help="a latent dataset directory of trainer.teacher (latents.safetensors + manifest.json)")
    p.add_argument("--num-clips", type=int, default=None, help="the first N clips (default: all)")
    p.add_argument("--start", type=int, default=0, help="first latent frame of each clip's crop (0 = openings)")
    p.add_argument("--horizon", type=int, default=None, help="latent frames per crop (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="noise and bootstrap seed")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--per-clip", type=float, nargs="+", metavar="T", default=None,
                   help="instead of attribute shares: the share of each clip's own static and temporal part the "
                        "model's x_0 reproduces from the clip noised to each timestep T in (0, 1000] (1000 = pure "
                        "noise: what the caption alone gives; below, what the denoiser recovers from the clip)")
    p.add_argument("--pool", type=int, nargs="+", default=[1], metavar="K",
                   help="with --per-clip: also read clips and predictions averaged over K x K latent pixels "
                        "(coarser scales: where a camera move's change of size and place lies), one table row per K")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    args = p.parse_args(argv)
    try:
        results, meta = run(args)
    except ValueError as exc:
        print(f"trainer.eval.conditioning: error: {exc}", file=sys.stderr)
        return 2
    if args.per_clip is not None:
        doc = {"meta": meta, "per_clip": {t: {part: r.as_dict() for part, r in parts.items()}
                                          for t, parts in results.items()}}
        text = per_clip_table(results)
    else:
        doc, text = {"meta": meta, "attributes": _jsonable(results)}, table(results)
    print(json.dumps(doc, indent=2))
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


def run(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Attribute shares (or, with ``args.per_clip``, per-clip shares keyed by timestep) and the run's meta."""
    from safetensors.torch import load_file

    from streamgen.model.weights import load_transformer

    manifest_path, tensors_path = args.latents / "manifest.json", args.latents / "latents.safetensors"
    if not manifest_path.is_file() or not tensors_path.is_file():
        raise ValueError(f"{args.latents} holds no latent dataset (manifest.json and latents.safetensors)")
    manifest = json.loads(manifest_path.read_text())
    recorded = check_teacher(args.checkpoint, manifest["spec"]["vae_checkpoint"])
    horizon = args.horizon if args.horizon is not None else recorded
    if horizon is None:
        raise ValueError(f"{args.checkpoint} records no horizon (num_latent_frames); pass --horizon")
    if horizon < 1:
        raise ValueError(f"--horizon must be >= 1, got {horizon}")
    if args.resamples < 100:
        raise ValueError(f"--resamples must be >= 100 for a 95 % interval, got {args.resamples}")
    per_clip = args.per_clip
    if per_clip is not None and not all(0 < t <= 1000 for t in per_clip):
        raise ValueError(f"--per-clip timesteps must lie in (0, 1000], got {per_clip}")
    tensors = load_file(str(tensors_path))
    latents, text_emb, caption_ids = tensors["latents"], tensors["text_emb"], tensors["caption_ids"]
    n = len(latents) if args.num_clips is None else args.num_clips
    if not 1 <= n <= len(latents):
        raise ValueError(f"--num-clips must be in [1, {len(latents)}], got {n}")
    if args.start < 0 or args.start + horizon > latents.shape[2]:
        raise ValueError(f"a crop of {horizon} latent frames from frame {args.start} does not fit clips of "
                         f"{latents.shape[2]} frames")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_transformer(args.checkpoint).eval()
    if model.cfg.latent_channels != latents.shape[1]:
        raise ValueError(f"{args.checkpoint} has {model.cfg.latent_channels} latent channels, the dataset "
                         f"{latents.shape[1]}")
    data = latents[:n, :, args.start:args.start + horizon].float()
    emb = text_emb[caption_ids[:n]].float()
    pools = list(args.pool)
    if per_clip is None and pools != [1]:
        raise ValueError("--pool needs --per-clip (the attribute shares read the latents as they are)")
    for k in pools:
        spatial_pool(data[:1], k)  # a bad --pool fails before the model runs
    meta = {"checkpoint": str(args.checkpoint), "latents": str(args.latents), "clips": n, "start": args.start,
            "horizon": horizon, "noise seed": args.seed, "bootstrap resamples": args.resamples}
    t0 = time.perf_counter()
    if per_clip is not None:
        shares = {}
        for t in per_clip:
            predictions = predict_x0(model, emb, data.shape[1:], args.seed, start=args.start, clips=data,
                                     timestep=t)
            for k in pools:
                key = f"{t:g}" if pools == [1] else f"{t:g}, pool {k}"
                shares[key] = per_clip_shares(spatial_pool(data, k), spatial_pool(predictions, k),
                                              num_resamples=args.resamples, seed=args.seed)

        def temporal_energy(x: torch.Tensor) -> float:
            return float((x - x.mean(dim=2, keepdim=True)).double().pow(2).sum())

        kept = {str(k): temporal_energy(spatial_pool(data, k)) / max(temporal_energy(data), 1e-300) for k in pools}
        return shares, {**meta, "timesteps": per_clip, "pools": pools,
                        "data temporal energy kept by each pool": kept,
                        "model seconds": round(time.perf_counter() - t0, 1)}
    predictions = predict_mean_clips(model, emb, data.shape[1:], args.seed, start=args.start)
    seconds = time.perf_counter() - t0
    results = measure(grams(data, predictions), manifest["attributes"][:n], num_resamples=args.resamples,
                      seed=args.seed)
    return results, {**meta, "timestep": 1000, "model seconds": round(seconds, 1)}


if __name__ == "__main__":
    sys.exit(main())
