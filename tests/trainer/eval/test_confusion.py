"""trainer.eval.confusion on constructed evaluations: rows, counts, windows and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.eval.confusion import confusion, main, table
from trainer.eval.suite import ClassifierEvaluation, ClipEvaluation

BASE = {"kind": "box", "colour": "teal", "material": "matte", "background": "white_table", "motion": "still",
        "camera": "static", "lighting": "soft", "tint": "neutral"}


def clip(i: int, captioned: dict[str, str], first_kind: str, last_kind: str | None = None) -> ClipEvaluation:
    read = [dict(captioned, kind=first_kind), dict(captioned, kind=last_kind or first_kind)]
    classified = ClassifierEvaluation([0, 16], read, np.zeros((2, 4)), None, None)
    return ClipEvaluation(f"clip{i}", "a caption", captioned, 32, 16.0, {}, 1.0, {}, classified)


def test_a_substitution_shows_off_the_diagonal_by_caption_pair() -> None:
    jar_blue = dict(BASE, kind="jar", colour="blue")
    clips = [clip(0, BASE, "jar"), clip(1, BASE, "jar"), clip(2, BASE, "box", last_kind="mug"),
             clip(3, jar_blue, "can"), ClipEvaluation("uncaptioned", None, None, 32, 16.0, {}, 1.0, {},
                                                      ClassifierEvaluation([0], [BASE], np.zeros((1, 4)), None, None))]
    assert confusion(clips, "kind", by="colour") == {"box/teal": {"box": 1, "jar": 2}, "jar/blue": {"can": 1}}
    assert confusion(clips, "kind") == {"box": {"box": 1, "jar": 2}, "jar": {"can": 1}}
    assert confusion(clips, "kind", window="last") == {"box": {"jar": 2, "mug": 1}, "jar": {"can": 1}}
    rendered = table("set", confusion(clips, "kind", by="colour"), "kind")
    assert "| box/teal |  |  | 1 |  |  | 2 | 1/3 |" in rendered and "| jar/blue |  |  |  | 1 |  |  | 0/1 |" in rendered


def test_bad_input_is_an_error() -> None:
    unread = ClipEvaluation("c", "a caption", BASE, 32, 16.0, {}, 1.0, {}, None)
    with pytest.raises(ValueError, match="without a classifier"):
        confusion([unread], "kind")
    with pytest.raises(ValueError, match="attributes are"):
        confusion([], "shape")
    assert main(["does/not/exist", "--by", "kind"]) == 2  # --by the attribute itself
    assert main(["does/not/exist"]) == 2  # no stored clips there
