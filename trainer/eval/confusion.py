"""``python -m trainer.eval.confusion``: what a stored set's clips are read as, caption by caption.

Adherence says how often an attribute is read as captioned; this says what it is read as instead. For
one attribute (``--attribute``, default ``kind``) and one window, every clip's classifier reading is
counted under its captioned value, or under the captioned pair of that attribute and another one
(``--by colour``: rows such as ``box/teal``), so a systematic substitution (a held-out teal box generated
as a jar) shows as a row whose counts sit off its own column. The rendered clips of the same captions,
read by the same classifier, are the instrument's own confusion: pass them as a second set to print both.

    python -m trainer.eval.confusion runs/eval_x/teacher_heldout_1x --by colour
    python -m trainer.eval.confusion SET_DIR [SET_DIR ...] --attribute colour --window last --out c.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from trainer.data.attributes import ATTRIBUTE_KEYS, ATTRIBUTE_VALUES
from trainer.eval.reference import WINDOWS, window_index
from trainer.eval.suite import ClipEvaluation


def confusion(clips: list[ClipEvaluation], attribute: str, by: str | None = None,
              window: str = "first") -> dict[str, dict[str, int]]:
    """``row -> {read value: clips}``; a row is the captioned ``attribute`` (or ``attribute/by``). Clips without
    a parseable caption are left out; a clip evaluated without the classifier is a ``ValueError``."""
    if attribute not in ATTRIBUTE_KEYS or (by is not None and by not in ATTRIBUTE_KEYS):
        raise ValueError(f"attributes are {list(ATTRIBUTE_KEYS)}, got {attribute!r}" + (f" / {by!r}" if by else ""))
    i = window_index(window)
    rows: dict[str, Counter[str]] = {}
    for c in clips:
        if c.classifier is None:
            raise ValueError(f"clip {c.name} was evaluated without a classifier")
        if c.attributes is None:
            continue
        row = c.attributes[attribute] + (f"/{c.attributes[by]}" if by else "")
        rows.setdefault(row, Counter())[c.classifier.predictions[i][attribute]] += 1
    return {row: dict(sorted(counts.items())) for row, counts in sorted(rows.items())}


def table(name: str, conf: dict[str, dict[str, int]], attribute: str) -> str:
    values = ATTRIBUTE_VALUES[attribute]
    lines = [f"{name}: captioned {attribute} (rows) read as (columns)",
             "| captioned | " + " | ".join(values) + " | read as captioned |",
             "|---|" + "---|" * (len(values) + 1)]
    for row, counts in conf.items():
        total = sum(counts.values())
        right = counts.get(row.split("/")[0], 0)
        lines.append(f"| {row} | " + " | ".join(str(counts.get(v, "")) for v in values)
                     + f" | {right}/{total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.eval.confusion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sets", nargs="+", type=Path, help="set directories (clips.npz + clips.json, trainer.compare)")
    p.add_argument("--attribute", default="kind", choices=list(ATTRIBUTE_KEYS))
    p.add_argument("--by", choices=list(ATTRIBUTE_KEYS), help="split rows by this captioned attribute too")
    p.add_argument("--window", default="first", choices=list(WINDOWS))
    p.add_argument("--classifier", default="checkpoints/attr_classifier.safetensors", help="attribute classifier")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        import dataclasses

        from trainer.eval.classifier import load_classifier
        from trainer.eval.paired import load_set
        from trainer.eval.suite import SuiteConfig, evaluate_set

        if args.by == args.attribute:
            raise ValueError("--by must name another attribute than --attribute")
        if not Path(args.classifier).is_file():
            raise ValueError(f"classifier {args.classifier} does not exist")
        classifier = load_classifier(args.classifier)
        cfg = dataclasses.replace(SuiteConfig(), oracle_metrics=False)  # the classifier's readings only
        result: dict[str, Any] = {"attribute": args.attribute, "by": args.by, "window": args.window, "sets": {}}
        for directory in args.sets:
            videos, _ = load_set(directory)
            clips = evaluate_set(videos, classifier, cfg).clips
            result["sets"][str(directory)] = confusion(clips, args.attribute, args.by, args.window)
    except ValueError as exc:
        print(f"trainer.eval.confusion: error: {exc}", file=sys.stderr)
        return 2
    from trainer.eval.paired import emit

    emit(result, args.out, "\n".join("\n" + table(name, conf, args.attribute) for name, conf in result["sets"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
