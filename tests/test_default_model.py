"""The committed default model: found by default, never silently replaced by random weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamgen import cli, default_model
from streamgen.config import get_preset
from streamgen.model.transformer import CausalWanTransformer
from streamgen.model.vae import CausalVideoVAE
from streamgen.model.weights import save_checkpoint
from streamgen.video_io import read_video
from tests.server.harness import ServeLog
from trainer.eval.classifier import load_classifier
from trainer.eval.suite import SuiteConfig, classify_clip, prompt_attributes


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(default_model.ENV_DIR, str(tmp_path))
    return tmp_path


def _write_valid(directory: Path) -> None:
    preset = get_preset("test")  # resolve() checks kind and integrity; the loaders check the preset
    save_checkpoint(CausalWanTransformer(preset.model), directory / default_model.STUDENT_FILE, kind="transformer",
                    config=preset.model)
    save_checkpoint(CausalVideoVAE(preset.vae), directory / default_model.VAE_FILE, kind="vae", config=preset.vae)


def test_default_paths_are_used_when_none_are_given(checkpoints: Path) -> None:
    _write_valid(checkpoints)
    assert default_model.resolve("default", None, None, False) == (checkpoints / default_model.STUDENT_FILE,
                                                                   checkpoints / default_model.VAE_FILE)
    given = (Path("a.safetensors"), Path("b.safetensors"))
    assert default_model.resolve("default", *given, False) == given
    assert default_model.resolve("test", None, None, True) == (None, None)


def test_missing_default_weights_name_the_restore_step(checkpoints: Path) -> None:
    with pytest.raises(ValueError, match="weights are missing.*student_default.safetensors not found"):
        default_model.resolve("default", None, None, False)


def test_corrupt_default_weights_are_refused(checkpoints: Path) -> None:
    _write_valid(checkpoints)
    (checkpoints / default_model.VAE_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="unusable.*STREAMGEN_CHECKPOINTS"):
        default_model.resolve("default", None, None, False)


def test_repo_hint_names_git_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(default_model.ENV_DIR, raising=False)
    assert "git checkout -- checkpoints/student_default.safetensors" in default_model.restore_hint(tmp_path)
    assert default_model.checkpoints_dir() == Path(default_model.__file__).resolve().parent.parent / "checkpoints"


@pytest.mark.parametrize(("preset", "transformer", "vae", "random_init", "message"), [
    ("test", None, None, False, "no committed weights"),
    ("default", Path("t.safetensors"), None, False, "give both"),
    ("default", Path("t.safetensors"), Path("v.safetensors"), True, "takes no"),
])
def test_inconsistent_flags_are_refused(preset: str, transformer: Path | None, vae: Path | None, random_init: bool,
                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        default_model.resolve(preset, transformer, vae, random_init)


@pytest.mark.parametrize("command", [["generate", "--prompt", "a red mug", "--num-frames", "4", "--out", "x.mp4"],
                                     ["serve", "--port", "0"]])
def test_cli_without_weights_exits_2_with_the_restore_step(checkpoints: Path, command: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "weights are missing" in err and "random" not in err.split("missing")[0]


# ---------------------------------------------------------------------------- the committed model, end to end
# What `make demo` does, on the real committed weights: `streamgen serve` with no model flags, the stream
# client writing an MP4, and the attribute classifier (trained on rendered clips) reading the product back
# out of each decoded file. Prompts follow the renderer's caption template, so their attributes are known;
# the first is the demo's. The model is not perfect (docs/quality.md: it renders red and yellow
# orange-ish), so the check is a rate far above chance (kind 1/6, colour 1/10, background 1/5 by chance):
# every background right, and at least 9 of the 12 kind / colour / background reads.
DEMO_PROMPTS = ["a matte blue mug standing still on a wooden table, static camera, bright lighting",
                "a matte blue box standing still on a white table, static camera, bright lighting",
                "a glossy orange bottle turning slowly in a dark studio, static camera, soft lighting",
                "a glossy red bottle turning slowly on a white table, static camera, soft lighting"]
CHECKED_KEYS = ("kind", "colour", "background")
MIN_CORRECT = 9


def test_serve_streams_the_prompted_product_from_the_committed_model(tmp_path: Path) -> None:
    """Fails (never skips) when the committed weights are missing: they are part of the repository."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != default_model.ENV_DIR}
    server = subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--port", "0", "--metrics-port", "-1",
                               "--log-format", "json"], cwd=repo, env=env, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True)
    log = ServeLog(server)
    try:
        address = str(log.wait_serving(timeout_s=120)["address"])
        classifier = load_classifier()
        reads: dict[str, dict[str, bool]] = {}
        for i, prompt in enumerate(DEMO_PROMPTS):
            out = tmp_path / f"clip{i}.mp4"
            done = subprocess.run([sys.executable, "-m", "clients.stream", "--server", address, "--prompt", prompt,
                                   "--seconds", "2", "--seed", str(i), "--out", str(out)], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            summary = json.loads(re.findall(r"^\{.*\}$", done.stdout, flags=re.M)[-1])
            assert summary["frames"] == 32
            frames = read_video(out)
            assert frames.shape == (32, 128, 128, 3)
            target = prompt_attributes(prompt)
            assert target is not None
            predicted = classify_clip(frames, 16.0, classifier, target, SuiteConfig()).predictions[0]
            reads[prompt] = {k: predicted[k] == target[k] for k in CHECKED_KEYS}
        assert all(r["background"] for r in reads.values()), reads
        assert sum(sum(r.values()) for r in reads.values()) >= MIN_CORRECT, reads
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0  # SIGTERM drains and exits 0
