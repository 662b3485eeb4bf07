"""benchmarks/gpu_check.py: refuses a machine without CUDA in one line, runs its plumbing on a CPU with the
packages the lent GPU image lacks blocked, and reads pytest's reports into counts and reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402  (a script beside the benchmarks, not a package)

NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_without_cuda_it_exits_2_in_one_line() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=NO_CUDA, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device") and "--allow-cpu" in lines[0]


def test_what_it_imports_needs_none_of_the_packages_the_gpu_image_lacks() -> None:
    """The engine, attention, model, device and benchmark modules import with PyAV, diffusers, grpc_tools,
    flash-attn and xformers refused (as on the lent GPU machines), and none of them was imported."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import gpu_check
        gpu_check.block_modules(gpu_check.GPU_IMAGE_MISSING)
        import streamgen.engine.engine, streamgen.attention, streamgen.model.transformer, streamgen.device
        import streamgen.precision, streamgen.perf, streamgen.video_io
        spec = importlib.util.spec_from_file_location("bench_engine", {str(SCRIPT.parent / "engine.py")!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print(sorted(m for m in sys.modules if m.split(".")[0] in gpu_check.GPU_IMAGE_MISSING))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**NO_CUDA, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_blocked_modules_fail_like_missing_ones() -> None:
    code = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_check\n"
            "gpu_check.block_modules(['wave'])\n"
            "try:\n    import wave\nexcept ModuleNotFoundError as e:\n    print('blocked', e.name)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "blocked wave", res.stderr


def test_the_carry_folder_makes_the_trainers_device_tests_importable_on_the_gpu_image(tmp_path: Path) -> None:
    """With the image's missing packages refused, the trainer's test conftest cannot be imported (so pytest would
    stop before any GPU test); with the
    folder --prepare-carry makes (accelerate, TensorBoard and their small dependencies, under 64 MiB) they are,
    and what they import comes from the carried copies."""
    manifest = gpu_check.prepare_carry(tmp_path / "carry")
    assert set(manifest["dists"]) == set(gpu_check.CARRY_DISTS) and 0 < manifest["bytes"] < 64 * 2**20
    assert (tmp_path / "carry" / "accelerate" / "__init__.py").is_file()
    tests = ["tests/trainer/test_self_forcing_device.py", "tests/trainer/common/test_runtime_device.py"]
    env = {**NO_CUDA, "PYTHONPATH": str(REPO), "STREAMGEN_TRAIN_LAZY_OK": "1"}
    probe = "import accelerate, tensorboard; print(accelerate.__file__); print(tensorboard.__file__)"

    def run(carry: Path | None) -> subprocess.CompletedProcess[str]:
        cmd = gpu_check._python(["pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *tests],
                                gpu_check.GPU_IMAGE_MISSING, module=True, carry=carry)
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    without = run(None)
    assert without.returncode != 0  # the trainer's conftest stops the whole session: no GPU test would run
    assert "the trainer needs the 'train' extra (missing: accelerate, tensorboard)" in without.stderr
    carried = run(tmp_path / "carry")
    assert carried.returncode == 0, (carried.stdout + carried.stderr)[-2000:]
    assert "test_runtime_device.py::" in carried.stdout
    script = tmp_path / "probe.py"
    script.write_text(probe + "\n")
    where = subprocess.run(gpu_check._python([str(script)], gpu_check.GPU_IMAGE_MISSING, module=False,
                                             carry=tmp_path / "carry"), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert where.returncode == 0, where.stderr[-2000:]
    paths = where.stdout.strip().splitlines()
    assert len(paths) == 2 and all(path.startswith(str(tmp_path / "carry")) for path in paths)


def test_the_carry_folder_is_never_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a carry folder"):
        gpu_check.prepare_carry(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    blocker = gpu_check._Blocker(["wave"], str(tmp_path / "carry"))
    with pytest.raises(ModuleNotFoundError, match="blocked"):  # a sibling folder is not the carry
        blocker.find_spec("wave.sub", [str(tmp_path / "carry_old" / "wave")])
    assert blocker.find_spec("wave.sub", [str(tmp_path / "carry" / "wave")]) is None  # the carry's own: allowed


def test_pytest_reports_become_counts_failures_and_import_reasons(tmp_path: Path) -> None:
    (tmp_path / "test_mixed.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="needs a CUDA device")
        def test_skipped(): pass
    """))
    (tmp_path / "test_missing.py").write_text("import av\n")
    result = gpu_check.run_pytest([str(tmp_path)], ["av"], timeout_s=120)
    # The module's dotted name is relative to pytest's rootdir (the checkout), so a module under the temp
    # dir gets a prefix that depends on where the checkout lies: compare its last part.
    not_collected = {name.rsplit(".", 1)[-1]: why for name, why in result["not_collected"].items()}
    assert (result["passed"], result["failed"], result["skipped"], not_collected) == (
        1, 1, 1, {"test_missing": "ModuleNotFoundError: No module named 'av' (blocked by gpu_check --block-modules)"})
    assert not result["ok"]
    assert [f["name"].rsplit(".", 1)[-1] for f in result["failures"]] == ["test_mixed::test_bad"]
    assert "one is not two" in result["failures"][0]["message"]


def test_cpu_dry_run_prints_one_json_summary(tmp_path: Path) -> None:
    """The engine step end to end on the tiny preset (the pytest steps are covered above, faster)."""
    out = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--skip", "gpu_tests,attention",
                          "--block-modules", ",".join(gpu_check.GPU_IMAGE_MISSING), "--out", str(out)],
                         cwd=REPO, env=NO_CUDA, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary == json.loads(out.read_text())
    assert summary["ok"] and summary["mode"] == "cpu dry run"
    assert summary["environment"]["cuda_available"] is False
    assert summary["environment"]["blocked_modules"] == list(gpu_check.GPU_IMAGE_MISSING)
    engine = summary["steps"]["engine_test"]
    assert engine["ok"] and engine["figures"]["preset"] == "test" and engine["figures"]["device"] == "cpu"
    assert engine["figures"]["rtf"] > 0


@pytest.mark.slow
def test_full_cpu_dry_run_with_every_step() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--block-modules",
                          ",".join(gpu_check.GPU_IMAGE_MISSING)], cwd=REPO, env=NO_CUDA, capture_output=True,
                         text=True, timeout=600)
    summary = json.loads(res.stdout)
    assert res.returncode == 0 and summary["ok"], json.dumps(summary["steps"], indent=1)[-3000:]
    assert summary["steps"]["attention_parity"]["passed"] > 0
