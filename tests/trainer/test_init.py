"""``import trainer`` without the ``train`` extra stops at once, naming the missing packages and the
install command (every ``python -m trainer.*`` entry point imports the package first)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import trainer

REPO = Path(__file__).resolve().parents[2]


def test_checked_packages_are_the_train_extra() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in extras["train"]}
    assert set(trainer.TRAIN_EXTRA.values()) == declared


@pytest.mark.parametrize("entry_point", ["trainer.self_forcing", "trainer.evaluate"])
def test_entry_point_without_the_train_extra_names_it(entry_point: str) -> None:
    # A None entry in sys.modules makes the module unfindable, as if it were not installed.
    code = ("import runpy, sys; sys.modules['accelerate'] = sys.modules['matplotlib'] = None; "
            f"runpy.run_module({entry_point!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last == ("ModuleNotFoundError: the trainer needs the 'train' extra (missing: accelerate, matplotlib): "
                    "pip install 'streamgen[train]'")

