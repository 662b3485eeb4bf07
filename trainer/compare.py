"""``python -m trainer.compare``: teacher and students against rendered clips of the same captions, with intervals.

The evidence that the trainer works. For every prompt split (``in_distribution``: trained
(kind, colour) combinations with unseen captions, render and noise seeds; ``heldout``: the
combinations no model saw) and every length (multiples of the teacher's horizon), the
renderer draws the prompts once (the *reference*, also reported as a row of its own: the
rendered clips' own values) and every model generates the same prompts with the same seeds.
Each generated set is then measured against the reference by :mod:`trainer.eval.reference`:

* KID of attribute-classifier features at the first and the last window, with a bootstrap
  interval; beside it the Frechet distance on the reference's top principal components where
  there are enough clips for them;
* adherence per attribute at the first and the last window, beside the classifier's accuracy on
  the rendered clips; attributes it cannot read there are *unmeasured* and left out of the mean;
* per-clip stability (last window / first window of luma, motion, subject area, adherence)
  against the paired rendered clip's own ratio;
* orderings between models only where bootstrap intervals separate, else "not separable".

Generated clips are stored losslessly in ``OUT/<model>_<split>_<k>x/clips.npz`` and reused by a
later run made with the same checkpoint (by content hash), prompts, seed and length: generation
is the slow part on a CPU. Their latents are stored beside them (``latents.npz``): a run with
another VAE of the same latent space (a decoder fine-tune: same encoder weights and latent
stats, :func:`trainer.eval.inputs.latent_space_id`) decodes those instead of generating again.
Each set also gets the per-set report of :mod:`trainer.eval.report`.

``--vae-row`` adds the row ``vae``: the rendered clips encoded and decoded by the VAE, what any
model in its latent space could at best score. An attribute the ``vae`` row already loses is the
VAE's to fix, not the generator's.

    python -m trainer.compare --teacher checkpoints/teacher_default.safetensors \\
        --student sfpp=checkpoints/student_default.safetensors --multiples 1 10 \\
        --num-clips 64 --long-clips 8 --out reports/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.attributes import ATTRIBUTE_KEYS
from trainer.eval.inputs import PROMPT_SPLITS
from trainer.eval.reference import STABILITY_CURVES, WINDOWS
from trainer.eval.stats import MIN_KID_SAMPLES, NOT_SEPARABLE, Interval, order

RENDERED = "rendered"
VAE_ROW = "vae"  # the rendered clips through the VAE: the ceiling of any model in its latent space
MIN_STABILITY_CLIPS = 2
STUDENT_STAGES = ("ode_init", "self_forcing")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "teacher" (bidirectional, many steps, its horizon only) or "student" (causal, 4 steps, any length)
    checkpoint: Path


def parse_student(text: str) -> ModelSpec:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--student takes NAME=CHECKPOINT, got {text!r}")
    if name in (RENDERED, VAE_ROW, "teacher"):
        raise ValueError(f"--student name {name!r} is reserved")
    return ModelSpec(name, "student", Path(path))


def parse_split_clips(items: list[str]) -> dict[str, int]:
    """``["heldout=16", ...]`` -> ``{"heldout": 16}``: per-split clip counts at 1x."""
    out = {}
    for text in items:
        split, sep, count = text.partition("=")
        if not sep or split not in PROMPT_SPLITS or not count.isdigit():
            raise ValueError(f"--split-clips takes SPLIT=N with SPLIT one of {list(PROMPT_SPLITS)}, got {text!r}")
        out[split] = int(count)
    return out


def teacher_horizon(path: Path) -> int:
    """The teacher's horizon in latent frames, from its checkpoint metadata."""
    from streamgen.model.weights import read_metadata

    value = read_metadata(path).get("num_latent_frames")
    if value is None:
        raise ValueError(f"teacher checkpoint {path} records no num_latent_frames; pass --horizon")
    return int(value)


def check_checkpoint(m: ModelSpec, horizon: int) -> None:
    """A clear error for a checkpoint of the wrong kind (teacher vs student) or trained at another horizon."""
    from streamgen.model.weights import read_metadata

    meta = read_metadata(m.checkpoint)
    if meta.get("kind") != "transformer":
        raise ValueError(f"{m.name}: {m.checkpoint} is a {meta.get('kind')!r} checkpoint, not a transformer")
    stage = meta.get("stage")
    if m.kind == "teacher" and stage is not None:
        raise ValueError(f"{m.name}: {m.checkpoint} is a causal student ({stage}), not the bidirectional teacher")
    if m.kind == "student" and stage not in STUDENT_STAGES:
        raise ValueError(f"{m.name}: {m.checkpoint} records no student stage (one of {list(STUDENT_STAGES)}); "
                         "is it the teacher?")
    trained = meta.get("num_latent_frames")
    if trained is not None and int(trained) != horizon:
        raise ValueError(f"{m.name}: {m.checkpoint} was trained at a horizon of {trained} latent frames, "
                         f"this comparison's horizon is {horizon}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_meta(m: ModelSpec, prompts: list[str], num_frames: int, args: argparse.Namespace) -> dict[str, Any]:
    """What made a set of generated clips: a stored set is reused only when all of it matches.

    ``dtype``: the students' ``--dtype``; the teacher samples under the trainer's ``precision: auto``
    (bf16 autocast on a CPU with native bf16, else float32), so its record says which it was.
    """
    from streamgen.precision import resolve_precision

    teacher_dtype = "bfloat16 autocast" if resolve_precision("auto")[0] == "bf16" else "float32"
    meta: dict[str, Any] = {"model": m.kind, "checkpoint": str(m.checkpoint),
                            "checkpoint_sha256": file_sha256(m.checkpoint), "vae": str(args.vae),
                            "vae_sha256": file_sha256(args.vae),
                            "preset": args.preset, "prompts": prompts, "seed": args.seed, "num_frames": num_frames,
                            "dtype": teacher_dtype if m.kind == "teacher" else args.dtype,
                            "text_encoder": args.text_encoder}
    if m.kind == "teacher":
        meta.update({"teacher_steps": args.teacher_steps, "cfg_scale": args.cfg_scale})
    return meta


# ---------------------------------------------------------------------------------------------
# Orderings and Markdown.


def _interval(d: dict[str, Any] | None) -> Interval | None:
    if d is None or d.get("value") is None:
        return None
    return Interval(d["value"], d["low"], d["high"], d["n"], d["level"])


def orderings(rows: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Pairwise verdicts between models on the same split and length: KID (lower better), mean adherence."""
    out = []
    groups: dict[tuple[str, str], list[str]] = {}
    for key, r in rows.items():
        if r["model"] not in (RENDERED, VAE_ROW):  # the references are not models to order
            groups.setdefault((r["split"], r["length"]), []).append(key)
    for (split, length), keys in groups.items():
        windows = ["first"] if length == "1x" else list(WINDOWS)
        for ka, kb in itertools.combinations(keys, 2):
            a, b = rows[ka], rows[kb]
            for window in windows:
                checks = (("KID", "distances", False), ("adherence (measured attributes)", "adherence_mean", True))
                for metric, field, higher_is_better in checks:
                    ia = _interval(a[field][window]["kid"] if field == "distances" else a[field][window])
                    ib = _interval(b[field][window]["kid"] if field == "distances" else b[field][window])
                    verdict = (order(a["model"], ia, b["model"], ib, higher_is_better)
                               if ia is not None and ib is not None else NOT_SEPARABLE)
                    out.append({"split": split, "length": length, "window": window, "metric": metric,
                                "a": a["model"], "b": b["model"], "verdict": verdict})
    return out


def _fmt(d: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    i = _interval(d)
    return "n/a" if i is None else i.format(digits, scale)


def _adherence_cell(a: dict[str, Any], rendered: bool) -> str:
    # The rendered row is the instrument check itself: always its accuracy, marked where unreadable.
    if rendered:
        return _fmt(a["generated"]) + ("" if a["measured"] else " (unreadable)")
    return _fmt(a["generated"]) if a["measured"] else "unmeasured"


def markdown(rows: dict[str, dict[str, Any]], verdicts: list[dict[str, str]], meta: dict[str, Any]) -> str:
    lines = ["# Teacher and students against the rendered reference", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "All intervals are 95 % bootstrap percentile intervals over clips."]
    if any(r["model"] == VAE_ROW for r in rows.values()):
        lines += ["", f"*{VAE_ROW}*: the rendered clips encoded and decoded by the VAE, the best any model in its "
                  "latent space could score (a reference, not ordered against the models)."]
    lines += ["",
              "## Distance to the rendered clips of the same captions", "",
              "KID x 1000 (classifier features, unbiased; 0 = same distribution). Frechet distance on the "
              "reference's top principal components (n/a where there are too few clips for them).", "",
              "| model | split | length | clips | KID first window | KID last window | Frechet first | Frechet last |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        if r["model"] == RENDERED:
            continue
        d = r["distances"]
        lines.append(f"| {r['model']} | {r['split']} | {r['length']} | {r['num_clips']} | "
                     f"{_fmt(d['first']['kid'], 1, 1000)} | {_fmt(d['last']['kid'], 1, 1000)} | "
                     f"{_fmt(d['first']['frechet'], 1)} | {_fmt(d['last']['frechet'], 1)} |")
    splits_lengths = list(dict.fromkeys((r["split"], r["length"]) for r in rows.values()))
    for split, length in splits_lengths:
        group = [r for r in rows.values() if r["split"] == split and r["length"] == length]
        for window in (["first"] if length == "1x" else list(WINDOWS)):
            lines += ["", f"## Adherence per attribute: {split}, {length}, {window} window", "",
                      "Share of clips whose classified attribute matches the caption. *rendered* = the classifier's "
                      "accuracy on the rendered clips of the same captions; an attribute it reads below "
                      "chance + 0.5 x (1 - chance) there is unmeasured and left out of the mean.", "",
                      "| model | " + " | ".join(ATTRIBUTE_KEYS) + " | mean (measured) |",
                      "|---|" + "---|" * (len(ATTRIBUTE_KEYS) + 1)]
            for r in group:
                per = r["adherence"][window]
                cells = (_adherence_cell(per[k], r["model"] == RENDERED) for k in ATTRIBUTE_KEYS)
                lines.append(f"| {r['model']} | " + " | ".join(cells)
                             + f" | {_fmt(r['adherence_mean'][window])} |")
            ref = group[0]["adherence"][window]
            lines.append("| (chance) | " + " | ".join(f"{ref[k]['chance']:.2f}" for k in ATTRIBUTE_KEYS) + " | |")
            for r in group:
                if r["model"] == RENDERED:
                    continue
                per = r["adherence"][window]
                cells = [f"{per[k]['of_rendered']:.2f}" if per[k]["measured"] and per[k]["of_rendered"] is not None
                         and math.isfinite(per[k]["of_rendered"]) else "-" for k in ATTRIBUTE_KEYS]
                lines.append(f"| {r['model']} / rendered | " + " | ".join(cells) + " | |")
                if window == "last":
                    first = r["adherence"]["first"]
                    ratios = [per[k]["generated"]["value"] / first[k]["generated"]["value"]
                              if per[k]["measured"] and first[k]["measured"] and first[k]["generated"]["value"]
                              else math.nan for k in ATTRIBUTE_KEYS]
                    lines.append(f"| {r['model']} last / first | "
                                 + " | ".join("-" if not math.isfinite(x) else f"{x:.2f}" for x in ratios) + " | |")
        if length != "1x":
            lines += ["", f"## Stability per clip: {split}, {length} (last window / first window)", "",
                      "Each clip's ratio beside the rendered clip of its caption. p10 / p50 / p90 of the ratios; "
                      "MAD = median |ratio - rendered ratio|; outside = share of clips outside the rendered clips' "
                      "range (min..max).", "",
                      "| model | quantity | clips judged | ratio p10 / p50 / p90 | rendered p10 / p50 / p90 | "
                      "MAD | outside rendered range | verdict |", "|---|---|---|---|---|---|---|---|"]
            for r in group:
                if r["model"] == RENDERED:
                    continue
                for q in STABILITY_CURVES:
                    s = r["stability"].get(q)
                    if s is None:
                        continue
                    dist, rdist = s["distribution"], s["reference_distribution"]
                    qs = " / ".join("n/a" if dist[p] is None or not math.isfinite(dist[p]) else f"{dist[p]:.2f}"
                                    for p in ("p10", "p50", "p90"))
                    rqs = " / ".join("n/a" if rdist[p] is None or not math.isfinite(rdist[p]) else f"{rdist[p]:.2f}"
                                     for p in ("p10", "p50", "p90"))
                    verdict = "**drift**" if s["flagged"] else "within" if s["num_judged"] >= 2 else "not judged"
                    lines.append(f"| {r['model']} | {q} | {s['num_judged']} | {qs} | {rqs} | "
                                 f"{_fmt(s['median_abs_deviation'])} | {_fmt(s['share_outside'])} | {verdict} |")
    if verdicts:
        lines += ["", "## Orderings (claimed only where the intervals separate)", "",
                  "| split | length | window | metric | models | verdict |", "|---|---|---|---|---|---|"]
        for v in verdicts:
            lines.append(f"| {v['split']} | {v['length']} | {v['window']} | {v['metric']} | {v['a']} vs {v['b']} | "
                         f"{v['verdict']} |")
    lines += ["", "Per-set details (clips, oracle metrics, drift curves): `<model>_<split>_<k>x/report.md`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run.


def _validate(args: argparse.Namespace) -> None:
    if min([args.num_clips, *parse_split_clips(args.split_clips).values()]) < MIN_KID_SAMPLES:
        raise ValueError(f"--num-clips and --split-clips must be >= {MIN_KID_SAMPLES}: KID and its interval need "
                         f"{MIN_KID_SAMPLES} clips per set")
    if args.long_clips is not None and args.long_clips < MIN_STABILITY_CLIPS:
        # Long clips are what a CPU can least afford; below 8 their KID is reported as n/a with the reason.
        raise ValueError(f"--long-clips must be >= {MIN_STABILITY_CLIPS}: per-clip stability needs "
                         f"{MIN_STABILITY_CLIPS} clips per set")
    if any(k < 1 for k in args.multiples):
        raise ValueError("--multiples must be >= 1")
    for split in list(args.splits) + list(args.long_splits or []):
        if split not in PROMPT_SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(PROMPT_SPLITS)}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from streamgen.config import get_preset
    from streamgen.precision import resolve_precision
    from trainer.eval import inputs
    from trainer.eval.classifier import load_classifier
    from trainer.eval.reference import ReferenceConfig, summarise_against_reference
    from trainer.eval.report import json_safe, write_report
    from trainer.eval.suite import SuiteConfig, evaluate_set, frechet_by_window

    _validate(args)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out: Path = args.out
    models = ([ModelSpec("teacher", "teacher", args.teacher)] if args.teacher else []) + \
        [parse_student(s) for s in args.student]
    if not models and not args.vae_row:
        raise ValueError("nothing to compare: give --teacher, --student NAME=CHECKPOINT and/or --vae-row")
    for m in models:
        if not m.checkpoint.is_file():
            raise ValueError(f"{m.name}: checkpoint {m.checkpoint} does not exist")
    if not Path(args.classifier).is_file():
        raise ValueError(f"classifier {args.classifier} does not exist (train it: python -m trainer.eval.classifier)")
    horizon = args.horizon or (teacher_horizon(args.teacher) if args.teacher else None)
    if horizon is None:
        raise ValueError("give --horizon (latent frames) when no --teacher is compared")
    for m in models:
        check_checkpoint(m, horizon)
    if not Path(args.vae).is_file():
        raise ValueError(f"VAE checkpoint {args.vae} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(args.preset)
    latent_space = inputs.latent_space_id(args.vae) if models else ""
    fps = float(preset.video.fps)
    classifier = load_classifier(args.classifier)
    long_cfg = SuiteConfig()
    # At 1x a clip has one classifier window: no drift to measure, so no oracle metrics (their
    # segmentation is most of the evaluation's cost); KID and adherence need only the classifier.
    short_cfg = dataclasses.replace(long_cfg, oracle_metrics=False)
    rcfg = ReferenceConfig(num_resamples=args.resamples, seed=args.seed)
    rows: dict[str, dict[str, Any]] = {}
    split_clips = parse_split_clips(args.split_clips)

    def log(text: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {text}", flush=True)

    for k in args.multiples:
        num_frames = preset.pixel_frames(horizon * k)
        splits = args.splits if k == 1 else (args.long_splits or args.splits)
        cfg = short_cfg if k == 1 else long_cfg
        for split in splits:
            n = split_clips.get(split, args.num_clips) if k == 1 else (args.long_clips or args.num_clips)
            prompts = inputs.split_prompts(split, n, args.seed)
            log(f"rendered reference: {split}, {k}x ({num_frames} frames, {n} clips)")
            rendered = inputs.render_reference(prompts, num_frames, preset.video.height, fps, args.seed + 1000)
            reference = evaluate_set(rendered, classifier, cfg)
            own = summarise_against_reference(reference, reference, rcfg)
            rows[f"{RENDERED}@{split}@{k}x"] = {"model": RENDERED, "split": split, "length": f"{k}x",
                                                **own.as_dict()}
            if args.vae_row:
                log(f"VAE reconstructions of the rendered clips: {split}, {k}x")
                recon = evaluate_set(inputs.reconstruct_videos(rendered, args.vae, args.preset), classifier, cfg)
                rows[f"{VAE_ROW}@{split}@{k}x"] = {"model": VAE_ROW, "split": split, "length": f"{k}x",
                                                   **summarise_against_reference(recon, reference, rcfg).as_dict()}
            for m in models:
                if m.kind == "teacher" and k != 1:
                    continue  # the bidirectional teacher only exists at its own horizon
                set_dir = out / f"{m.name}_{split}_{k}x"
                meta = clip_meta(m, prompts, num_frames, args)
                videos = inputs.load_clips(set_dir, meta)
                if videos is None:
                    # The latents do not depend on the decoder: stored ones of the same latent space are decoded.
                    lmeta = {**{key: v for key, v in meta.items() if key not in ("vae", "vae_sha256")},
                             "latent_space": latent_space}
                    stored = inputs.load_latents(set_dir, lmeta)
                    if stored is not None:
                        log(f"decoding stored latents of {m.name} with {args.vae}: {split}, {k}x")
                        videos = inputs.decode_latents(stored, args.vae, args.preset, prompts, num_frames, m.kind)
                    else:
                        log(f"generating {m.name}: {split}, {k}x")
                        latents: list[Any] = []
                        if m.kind == "teacher":
                            videos = inputs.generate_teacher_videos(m.checkpoint, args.vae, args.preset, prompts,
                                                                    num_frames, args.seed, None, args.teacher_steps,
                                                                    args.cfg_scale, text=args.text_encoder,
                                                                    latents_out=latents)
                        else:
                            videos = inputs.generate_videos(m.checkpoint, args.vae, args.preset, prompts,
                                                            num_frames, args.seed, None, args.dtype,
                                                            args.text_encoder, latents_out=latents)
                        inputs.save_latents(set_dir, latents, lmeta)
                    inputs.save_clips(set_dir, videos, meta)
                else:
                    log(f"reusing stored clips of {m.name}: {split}, {k}x")
                evaluated = evaluate_set(videos, classifier, cfg)
                summary = summarise_against_reference(evaluated, reference, rcfg)
                sets = {m.name: evaluated, "reference (rendered)": reference}
                write_report(set_dir, f"{m.name}, {split}, {k}x", sets,
                             frechet_by_window(evaluated, reference, cfg), fps,
                             {"checkpoint": str(m.checkpoint), "length": f"{k}x ({num_frames} frames)"}, cfg)
                rows[f"{m.name}@{split}@{k}x"] = {"model": m.name, "split": split, "length": f"{k}x",
                                                  **summary.as_dict()}
    verdicts = orderings(rows)
    meta_out = {"prompts": f"in_distribution: train-split captions of dataset seed "
                           f"{args.seed + inputs.IN_DISTRIBUTION_SEED_OFFSET}; heldout: held-out captions of seed "
                           f"{args.seed}; noise seeds {args.seed} + clip index; render seeds from {args.seed + 1000}",
                "teacher horizon": f"{horizon} latent frames ({preset.pixel_frames(horizon)} pixel frames, "
                                   f"{preset.pixel_frames(horizon) / fps:.2f} s)",
                "teacher sampler": f"{args.teacher_steps} Euler steps, CFG {args.cfg_scale}, "
                                   f"{resolve_precision('auto')[0]} ({resolve_precision('auto')[1]})",
                "students": f"4 steps, chunked KV-cache generation (rolling window) as served, {args.dtype}",
                "VAE": str(args.vae), "classifier": str(args.classifier),
                "bootstrap": f"{args.resamples} resamples, seed {args.seed}",
                "oracle metrics (segmentation)": "at multiples > 1 only: a 1x clip has one classifier window",
                "wall time (s)": round(time.time() - t0)}
    (out / "compare.json").write_text(json.dumps(json_safe({"meta": meta_out, "rows": rows, "orderings": verdicts}),
                                                 indent=1))
    (out / "compare.md").write_text(markdown(rows, verdicts, meta_out))
    return {"out": str(out), "sets": sorted(rows)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path, help="bidirectional teacher checkpoint (evaluated at 1x only)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a causal student to compare (repeatable)")
    p.add_argument("--vae", type=Path, default=Path("checkpoints/vae_default.safetensors"), help="VAE checkpoint")
    p.add_argument("--classifier", default="checkpoints/attr_classifier.safetensors",
                   help="attribute classifier checkpoint (adherence and features)")
    p.add_argument("--preset", default="default", help="model preset")
    p.add_argument("--horizon", type=int, help="teacher horizon in latent frames (default: teacher metadata)")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 10], help="lengths, in teacher horizons")
    p.add_argument("--splits", nargs="+", default=list(PROMPT_SPLITS), help=f"prompt splits, of {PROMPT_SPLITS}")
    p.add_argument("--num-clips", type=int, default=64, help="clips per split and model at 1x")
    p.add_argument("--split-clips", nargs="+", default=[], metavar="SPLIT=N",
                   help="clips per model at 1x for one split (default --num-clips)")
    p.add_argument("--long-clips", type=int, help="clips per split and model at multiples > 1 (default --num-clips; "
                   f"below {MIN_KID_SAMPLES} their KID is n/a)")
    p.add_argument("--long-splits", nargs="+", help="prompt splits at multiples > 1 (default --splits)")
    p.add_argument("--seed", type=int, default=0, help="prompt, noise, render and bootstrap seed")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher Euler steps")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="teacher guidance scale")
    p.add_argument("--vae-row", action="store_true",
                   help=f"add a row '{VAE_ROW}': the rendered clips encoded and decoded by the VAE, the best any "
                   "model in its latent space could score (separates the VAE's losses from the generator's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="student precision (float32: exact everywhere; bf16 is emulated, slow, on AVX2-only CPUs)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--text-encoder", choices=["minilm", "hash"], default="minilm",
                   help="prompt encoder; 'hash' is a model-free stand-in for tests")
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. reports/eval")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(json.dumps(run(args)))
    except ValueError as exc:
        print(f"trainer.compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
