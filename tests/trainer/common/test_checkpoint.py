"""Run checkpoints: atomic layout, the ``latest`` pointer, clear errors on corruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.common import checkpoint as ckpt


def state(step: int) -> ckpt.RunState:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ckpt.RunState(step=step, model=weights, ema=weights, optimizer=opt.state_dict(), config={"a": 1},
                         rng={0: ckpt.rng_state()})


def test_roundtrip_and_prune(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save(tmp_path, state(step), keep=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000003"
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == ["latest", "step_00000002",
                                                                               "step_00000003"]
    loaded = ckpt.load(latest)
    assert loaded.step == 3 and loaded.config == {"a": 1}
    assert set(loaded.model) == {"weight", "bias"}
    files = [p for p in ckpt.checkpoint_dir(tmp_path).rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), "checkpoints must be readable by others"


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_failed_save_keeps_previous_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save(tmp_path, state(1), keep=2)

    def crash(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_torch_save_atomic", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, state(2), keep=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000001"
    assert ckpt.load(latest).step == 1
    assert not any(p.name.endswith(".tmp") for p in ckpt.checkpoint_dir(tmp_path).iterdir())


@pytest.mark.parametrize("victim,match", [
    ("model.safetensors", "corrupt weights"),
    ("state.pt", "corrupt state.pt"),
])
def test_corrupt_file_raises(tmp_path: Path, victim: str, match: str) -> None:
    path = ckpt.save(tmp_path, state(1), keep=2)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load(path)


def test_missing_file_and_bad_pointer(tmp_path: Path) -> None:
    path = ckpt.save(tmp_path, state(1), keep=2)
    (path / "ema.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors is missing"):
        ckpt.load(path)
    (ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST).write_text("../../etc\n")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.latest_checkpoint(tmp_path)
    (ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST).write_text("step_00000009\n")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path)


def test_extra_state_round_trips_and_older_checkpoints_load_without_it(tmp_path: Path) -> None:
    history = [{"step": 2.0, "flag_rate/motion": 0.5}]
    saved = state(2)
    saved.extra = {"eval_history": history}
    latest = ckpt.save(tmp_path / "new", saved, keep=1)
    assert ckpt.load(latest).extra == {"eval_history": history}
    old = ckpt.save(tmp_path / "old", state(1), keep=1)
    raw = torch.load(old / "state.pt", weights_only=False)
    del raw["extra"]  # as written before the field existed
    torch.save(raw, old / "state.pt")
    assert ckpt.load(old).extra == {}
