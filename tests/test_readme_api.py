"""The README's Python API section runs as written, on the committed default model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_api_example_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and len(blocks[0].strip().splitlines()) == 5  # the 5-line example, then the switch
    monkeypatch.chdir(ROOT)  # the example names checkpoints/default relative to the clone
    printed: list[tuple[int, ...]] = []
    namespace: dict[str, object] = {"print": lambda shape: printed.append(tuple(shape))}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    frames = namespace["frames"]
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape[0] == 48
    assert sum(shape[0] for shape in printed) == 96 and all(shape[1:] == frames.shape[1:] for shape in printed)
    first, rest = namespace["first"], namespace["rest"]
    assert len(first) + sum(len(c) for c in rest) == 96  # type: ignore[arg-type]
    assert namespace["stream"].finish_reason == "completed"  # type: ignore[attr-defined]
