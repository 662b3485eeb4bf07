"""``python -m trainer.eval.paired``: two stored sets of the same captions, compared clip by clip.

:mod:`trainer.compare` orders two models only where their intervals separate, each interval
taken over its own clips. When both sets hold the *same captions in the same order* (every
``trainer.compare`` set of one split and length does: same prompts, noise seeds and render
seeds), the difference can be measured per caption instead: the share of clips whose attribute
is read as captioned in set A minus the share in set B is the mean of per-clip differences
(each -1, 0 or +1), and its bootstrap interval resamples captions, so the variation between
captions (some are hard for every model) cancels. A difference is claimed only where that
interval excludes 0; otherwise the verdict is "not separable".

Typical use: the same latents decoded by two VAE decoders, or two students on the same captions.
The sets must share captions, noise seed, length and frame rate (``clips.json``); sets of different
lengths pair on the first window only (``--windows first``, the default): it is the classifier's first
frames from frame 0 in both, so two models trained at different horizons compare there. Every attribute
gets a row; whether the classifier can read it at all is the rendered row of ``trainer.compare``
(an attribute unreadable there is no evidence either way here).

    python -m trainer.eval.paired --a runs/eval_new/sfpp_heldout_1x --b runs/eval_old/sfpp_heldout_1x \\
        --names new old --out runs/paired.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.attributes import ATTRIBUTE_KEYS
from trainer.eval.reference import WINDOWS, correct_per_clip
from trainer.eval.stats import DEFAULT_RESAMPLES, NOT_SEPARABLE, Interval, bootstrap_mean
from trainer.eval.suite import SetEvaluation


def difference_verdict(name_a: str, name_b: str, diff: Interval, higher_is_better: bool = True) -> str:
    """``"A better than B"`` where the interval of ``A - B`` excludes 0 on A's side, the reverse, else not separable."""
    if not (math.isfinite(diff.low) and math.isfinite(diff.high)) or diff.low <= 0.0 <= diff.high:
        return NOT_SEPARABLE
    a_wins = (diff.low > 0.0) == higher_is_better
    return f"{name_a} better than {name_b}" if a_wins else f"{name_b} better than {name_a}"


def paired_adherence(a: SetEvaluation, b: SetEvaluation, window: str = "first", names: tuple[str, str] = ("A", "B"),
                     num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per attribute: A's and B's adherence, the paired difference ``A - B`` with its interval, and the verdict.

    Raises ``ValueError`` unless clip ``i`` of both sets has the same caption for every ``i``.
    """
    if len(a.clips) != len(b.clips):
        raise ValueError(f"paired sets need the same clips: {len(a.clips)} against {len(b.clips)}")
    for ca, cb in zip(a.clips, b.clips, strict=True):
        if ca.attributes is None or ca.attributes != cb.attributes:
            raise ValueError(f"clip {ca.name} ({ca.prompt!r}) and clip {cb.name} ({cb.prompt!r}) do not share a "
                             "caption: a paired comparison needs the same captions in the same order")
    out = {}
    for key in ATTRIBUTE_KEYS:
        xa, xb = correct_per_clip(a.clips, key, window), correct_per_clip(b.clips, key, window)
        diff = bootstrap_mean(xa - xb, num_resamples, seed=seed)
        out[key] = {"a": bootstrap_mean(xa, num_resamples, seed=seed).as_dict(),
                    "b": bootstrap_mean(xb, num_resamples, seed=seed).as_dict(),
                    "difference": diff.as_dict(), "verdict": difference_verdict(*names, diff)}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.eval.paired", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="set directory A (clips.npz + clips.json, trainer.compare)")
    p.add_argument("--b", type=Path, required=True, help="set directory B, the same captions in the same order")
    p.add_argument("--names", nargs=2, default=["A", "B"], metavar=("NAME_A", "NAME_B"), help="names in verdicts")
    p.add_argument("--classifier", default="checkpoints/attr_classifier.safetensors", help="attribute classifier")
    p.add_argument("--windows", nargs="+", default=["first"], choices=list(WINDOWS), help="classifier windows")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


PAIRING_KEYS = ("prompts", "seed", "num_frames", "fps")  # what two stored sets must share to be paired


def pairing_mismatch(meta_a: dict[str, Any], meta_b: dict[str, Any], windows: list[str]) -> list[str]:
    """The ``clips.json`` keys two sets differ in that forbid pairing them on ``windows``.

    The length (``num_frames``) only matters past the first window: the first window is the same span (the
    classifier's first frames from frame 0) in clips of any length, so sets of different lengths pair there.
    """
    keys = [k for k in PAIRING_KEYS if k != "num_frames" or list(windows) != ["first"]]
    return [k for k in keys if meta_a.get(k) != meta_b.get(k)]


def load_set(directory: Path) -> tuple[list[Any], dict[str, Any]]:
    from trainer.eval.inputs import load_clips

    if not (directory / "clips.npz").is_file() or not (directory / "clips.json").is_file():
        raise ValueError(f"{directory} holds no stored clips (clips.npz + clips.json, written by trainer.compare)")
    videos = load_clips(directory, {})
    assert videos is not None  # both files exist and an empty meta matches any record
    return videos, json.loads((directory / "clips.json").read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from trainer.eval.classifier import load_classifier
    from trainer.eval.suite import SuiteConfig, evaluate_set

    if not Path(args.classifier).is_file():
        raise ValueError(f"classifier {args.classifier} does not exist")
    (va, meta_a), (vb, meta_b) = load_set(args.a), load_set(args.b)
    differ = pairing_mismatch(meta_a, meta_b, args.windows)
    if differ:
        raise ValueError(f"{args.a} and {args.b} differ in {differ}: a paired comparison needs the same captions, "
                         "noise seed and frame rate, and the same length unless only the first window is compared")
    classifier = load_classifier(args.classifier)
    cfg = dataclasses.replace(SuiteConfig(), oracle_metrics=False)  # adherence needs the classifier only
    ea, eb = evaluate_set(va, classifier, cfg), evaluate_set(vb, classifier, cfg)
    name_a, name_b = args.names
    result: dict[str, Any] = {"a": str(args.a), "b": str(args.b), "names": [name_a, name_b], "clips": len(va),
                              "num_frames": [meta_a.get("num_frames"), meta_b.get("num_frames")], "windows": {}}
    for window in args.windows:
        result["windows"][window] = paired_adherence(ea, eb, window, (name_a, name_b), args.resamples, args.seed)
    return result


def table(result: dict[str, Any]) -> str:
    name_a, name_b = result["names"]
    lines = [f"| window | attribute | {name_a} | {name_b} | {name_a} - {name_b} (95 % paired interval) | verdict |",
             "|---|---|---|---|---|---|"]
    for window, per in result["windows"].items():
        for key, r in per.items():
            a, b, d = r["a"], r["b"], r["difference"]
            if not np.isfinite(d["value"]):
                continue
            lines.append(f"| {window} | {key} | {a['value']:.2f} | {b['value']:.2f} | "
                         f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as exc:
        print(f"trainer.eval.paired: error: {exc}", file=sys.stderr)
        return 2
    emit(result, args.out, table(result))
    return 0


def emit(result: dict[str, Any], out: Path | None, text: str) -> None:
    """An evaluation CLI's output: the JSON on stdout (and in ``out`` when given), then its table."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
