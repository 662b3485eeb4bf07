"""The preview entry point writes a PNG strip and prints the caption."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.data.attributes import sample_clip_spec
from trainer.data.captions import caption
from trainer.data.preview import main


def test_preview_writes_strip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "strip.png"
    assert main(["--seed", "3", "--frames", "8", "--size", "32", "--columns", "4", "--mask", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 32, 2 * 32)
    assert capsys.readouterr().out.splitlines()[0] == caption(sample_clip_spec(3))


def test_preview_help() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
