"""One command for a CUDA machine: device tests, paged-attention parity on the GPU, the engine benchmark; one JSON.

    python benchmarks/gpu_check.py                 # on a CUDA machine, from the source tree (no pip install)
    python benchmarks/gpu_check.py --allow-cpu     # plumbing dry run on a CPU: same steps, tiny preset
    python benchmarks/gpu_check.py --block-modules av,diffusers,grpc_tools,flash_attn,xformers --allow-cpu
                                                   # ... as if those packages were missing (the lent GPU image)

Steps, each in its own subprocess with its own time limit, all within ``--budget-s`` (default 480 s,
the 8 minutes one H100 gets):

1. ``pytest -m gpu`` over ``tests/``: every test marked ``gpu`` (they skip, saying why, without CUDA).
   Test modules that cannot be imported here (a package the image lacks) are listed, not fatal.
2. ``pytest tests/attention``: every paged backend against the SDPA reference on the same pages
   (backends not installed skip with the reason their ``create()`` gives).
3. ``benchmarks/engine.py --quick --hash-text`` at the ``default`` preset (SDPA) and the ``wan-1.3b``
   preset with ``--attention flex`` (compiled flex reading the 256-token pages in place; the JSON counts
   the paged calls by path) with random weights on ``cuda:0`` (the ``test`` preset on a CPU dry run).

It needs only what the lent GPU machines have (torch with CUDA, Triton, pytest, numpy, safetensors,
transformers): it runs from the source tree (``PYTHONPATH`` set to the checkout), imports no PyAV,
diffusers or gRPC stub generator on these paths, and installs nothing. The trainer's device tests also
need accelerate and TensorBoard, which that image lacks: ``--prepare-carry DIR`` (on the development
machine) copies them and their small dependencies from this environment into ``DIR`` (default
``.gpu_carry/``, git-ignored, at most 64 MiB; the files travel with the checkout), and the check appends
``DIR`` to the steps' ``sys.path`` (after the image's own packages, which win). Plotting and SciPy stay
behind: the trainer imports them lazily, and the check tells it so (``STREAMGEN_TRAIN_LAZY_OK``).

    python benchmarks/gpu_check.py --prepare-carry .gpu_carry    # here, before the GPU run

The summary is printed as one JSON document on stdout (``--out`` also writes it to a file). Exit codes:
0 every step passed, 1 a step failed, 2 no CUDA device (without ``--allow-cpu``) or bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# What the lent GPU image lacks; --block-modules with these simulates it on any machine (a carried copy,
# --carry, still imports: the blocker refuses only what would come from elsewhere).
GPU_IMAGE_MISSING = ("av", "diffusers", "grpc_tools", "flash_attn", "xformers", "accelerate", "psutil",
                     "tensorboard", "absl", "markdown", "werkzeug", "matplotlib", "scipy")
# Distributions --prepare-carry copies (the trainer's accelerate and TensorBoard with what they need beyond
# the image: torch, numpy, PyYAML, packaging, huggingface-hub, grpcio and MarkupSafe are there).
CARRY_DISTS = ("accelerate", "psutil", "tensorboard", "absl-py", "markdown", "protobuf", "werkzeug")
CARRY_LIMIT_BYTES = 64 * 1024 * 1024
DEFAULT_CARRY = REPO / ".gpu_carry"
OPTIONAL_PACKAGES = ("triton", "flash_attn", "xformers", "av", "diffusers", "grpc_tools", "accelerate")
# Result fields of benchmarks/engine.py carried into the summary.
ENGINE_FIELDS = ("preset", "device", "dtype", "attention", "paged_attention_calls", "rtf", "generated_fps",
                 "ttff_s", "latency_ratio_200_10", "batch1_fps", "batch4_fps", "batch4_over_1",
                 "cache_speedup_21", "pipeline_speedup_21", "mfu", "mfu_3_frames", "matmul_peak_gflops",
                 "forward_s_3_frames", "forward_s_12_frames", "join_ttff_s", "warm_up_s", "ttff_early_s",
                 "ttff_whole_s")


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import name`` fail as if the package were not installed."""

    def __init__(self, names: Sequence[str], allowed_dir: str | None = None) -> None:
        self.names = frozenset(names)
        self.allowed_dir = allowed_dir

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] not in self.names:
            return None
        if self.allowed_dir is not None:  # a carried copy imports; the installed one stays "missing"
            from importlib.machinery import PathFinder

            if "." in fullname:
                inside = [str(p) == self.allowed_dir or str(p).startswith(self.allowed_dir + os.sep)
                          for p in path or []]
                if inside and all(inside):
                    return None
            elif (spec := PathFinder.find_spec(fullname, [self.allowed_dir])) is not None:
                return spec
        raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by gpu_check --block-modules)",
                                  name=fullname)


def block_modules(names: Sequence[str], allowed_dir: str | None = None) -> None:
    """Refuse imports of ``names`` (top-level packages) in this process from now on, except copies under
    ``allowed_dir`` (the carry folder)."""
    if names:
        sys.meta_path.insert(0, _Blocker(names, allowed_dir))


def prepare_carry(target: Path, dists: Sequence[str] = CARRY_DISTS) -> dict[str, Any]:
    """Copy the installed files of ``dists`` (code and ``.dist-info``, no scripts) from this environment into
    ``target``, a folder importable as a site directory; refuse beyond :data:`CARRY_LIMIT_BYTES`."""
    import shutil

    copied: dict[str, dict[str, Any]] = {}
    total = 0
    if target.exists() and any(target.iterdir()) and not (target / "CARRY.json").is_file():
        raise ValueError(f"{target} exists and is not a carry folder (no CARRY.json): choose a new folder")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in dists:
        dist = importlib.metadata.distribution(name)
        size = 0
        for file in dist.files or []:
            rel = Path(str(file))
            if rel.is_absolute() or ".." in rel.parts or rel.suffix == ".pyc":
                continue  # console scripts and caches live outside the site directory
            src = Path(str(dist.locate_file(file)))
            if not src.is_file():
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            size += src.stat().st_size
        copied[name] = {"version": dist.version, "bytes": size}
        total += size
    if total > CARRY_LIMIT_BYTES:
        shutil.rmtree(target)
        raise ValueError(f"the carried packages take {total / 2**20:.1f} MiB, over the 64 MiB a device run carries")
    manifest = {"dists": copied, "bytes": total, "python": platform.python_version(), "platform": platform.machine()}
    (target / "CARRY.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _python(argv: Sequence[str], blocked: Sequence[str], *, module: bool, carry: Path | None = None) -> list[str]:
    """A command running ``python -m argv[0] argv[1:]`` (or the script ``argv[0]``) with ``blocked`` refused
    and ``carry`` appended to ``sys.path``."""
    if not blocked and carry is None:
        return [sys.executable, *(["-m"] if module else []), *argv]
    run = (f"runpy.run_module({argv[0]!r}, run_name='__main__', alter_sys=True)" if module
           else f"runpy.run_path({argv[0]!r}, run_name='__main__')")
    allowed = None if carry is None else str(carry)
    boot = (f"import runpy, sys\nsys.path.insert(0, {str(HERE)!r})\nfrom gpu_check import block_modules\n"
            + ("" if carry is None else f"sys.path.append({allowed!r})\n")
            + f"block_modules({list(blocked)!r}, {allowed!r})\nsys.argv = {list(argv)!r}\n{run}\n")
    return [sys.executable, "-c", boot]


@dataclass
class Budget:
    """Seconds left of the whole check; each step gets at most its own limit and what is left."""

    total_s: float
    t0: float

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def limit(self, step_s: float) -> float:
        return max(1.0, min(step_s, self.left()))


def _run(cmd: list[str], timeout_s: float) -> tuple[int | None, str, float]:
    """(return code, or None on timeout; stdout+stderr tail; seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1", "STREAMGEN_TRAIN_LAZY_OK": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - t0
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _junit(path: Path) -> list[dict[str, str]]:
    """Every test case of a pytest JUnit XML report: name, outcome, message.

    Outcomes: passed, failed, error, skipped, and ``not_collected`` for a test module that could not be
    imported (its message is the import error, e.g. a package the GPU image lacks).
    """
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is None:
                continue
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            message = child.get("message") or ""
            if message == "collection failure":
                outcome = "not_collected"
                errors = [line[1:].strip() for line in (child.text or "").splitlines() if line.startswith("E ")]
                message = errors[-1] if errors else message
            message = (message.strip().splitlines() or [""])[0][:300]
            break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        cases.append({"name": name, "outcome": outcome, "message": message})
    return cases


def run_pytest(args: Sequence[str], blocked: Sequence[str], timeout_s: float,
               carry: Path | None = None) -> dict[str, Any]:
    """``pytest args`` in a subprocess; counts by outcome, the failures, and the modules that would not import."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        argv = ["pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-rs",
                f"--junitxml={report}", *args]
        code, output, seconds = _run(_python(argv, blocked, module=True, carry=carry), timeout_s)
        cases = _junit(report) if report.is_file() else []
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped", "not_collected")}
    # A module that cannot be imported here is listed, not a failure (pytest then exits 1 even with every
    # collected test passing); "no tests ran" (5) is not one either: on a CPU the gpu tests all skip.
    ok = code in (0, 1, 5) and counts["failed"] == 0 and counts["error"] == 0 and counts["passed"] + \
        counts["skipped"] > 0
    result: dict[str, Any] = {"ok": ok, "returncode": code, "elapsed_s": round(seconds, 1), **counts,
                              "failures": [c for c in cases if c["outcome"] in ("failed", "error")][:20],
                              "not_collected": {c["name"]: c["message"] for c in cases
                                                if c["outcome"] == "not_collected"}}
    if code is None:
        result["timed_out_after_s"] = round(timeout_s, 1)
    if not cases or code not in (0, 1, 5):
        result["output_tail"] = output[-2000:]
    if "the trainer needs the 'train' extra" in output:
        result["hint"] = ("the trainer's packages are missing here: run `python benchmarks/gpu_check.py "
                          "--prepare-carry .gpu_carry` where they are installed and bring the folder along")
    return result


def run_engine_benchmark(preset: str, device: str, blocked: Sequence[str], timeout_s: float,
                         kv_memory_mb: float, attention: str = "sdpa") -> dict[str, Any]:
    """``benchmarks/engine.py --quick --hash-text`` at ``preset`` with ``attention``; its headline figures."""
    argv = [str(HERE / "engine.py"), "--preset", preset, "--device", device, "--quick", "--hash-text",
            "--threads", str(max(1, (os.cpu_count() or 2) // 2)), "--kv-memory-mb", str(kv_memory_mb),
            "--attention", attention]
    code, output, seconds = _run(_python(argv, blocked, module=False), timeout_s)
    result: dict[str, Any] = {"ok": False, "returncode": code, "elapsed_s": round(seconds, 1)}
    start = output.find("{\n")
    if code == 0 and start >= 0:
        figures, _ = json.JSONDecoder().raw_decode(output[start:])
        result.update(ok=True, figures={k: figures[k] for k in ENGINE_FIELDS if k in figures})
    else:
        if code is None:
            result["timed_out_after_s"] = round(timeout_s, 1)
        result["output_tail"] = output[-2000:]
    return result


def environment(blocked: Sequence[str]) -> dict[str, Any]:
    """What this machine has: Python, torch and its CUDA, the device, optional packages (found, not imported)."""
    import torch

    from streamgen.device import device_info

    def version(package: str) -> str | None:
        if package in blocked or importlib.util.find_spec(package) is None:
            return None
        try:
            return importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            return "present"

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": cuda,
                           "packages": {p: version(p) for p in OPTIONAL_PACKAGES}, "blocked_modules": list(blocked)}
    if cuda:
        device = torch.device("cuda", 0)
        env.update(device=device_info(device).describe(),
                   bf16_supported=torch.cuda.is_bf16_supported(including_emulation=False),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   num_devices=torch.cuda.device_count())
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without CUDA as a dry run of the plumbing (tiny preset; figures mean nothing)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps together")
    parser.add_argument("--block-modules", default="",
                        help=f"comma-separated packages to treat as missing, e.g. {','.join(GPU_IMAGE_MISSING)}")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: gpu_tests, attention, engine")
    parser.add_argument("--presets", default=None,
                        help="engine benchmark runs, PRESET[:BACKEND] (default: default,wan-1.3b:flex on CUDA, so "
                             "the 1.3B run reaches flex's fused paged kernel; test with --allow-cpu)")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--carry", type=Path, default=None,
                        help="folder of carried packages appended to the steps' sys.path "
                             f"(default {DEFAULT_CARRY.name}/ when it exists)")
    parser.add_argument("--prepare-carry", type=Path, metavar="DIR", default=None,
                        help="copy the trainer's accelerate and TensorBoard (and what they need beyond the GPU image) "
                             "from this environment into DIR, then exit")
    args = parser.parse_args(argv)
    if args.prepare_carry is not None:
        try:
            print(json.dumps(prepare_carry(args.prepare_carry.resolve()), indent=2))
        except (importlib.metadata.PackageNotFoundError, ValueError) as exc:
            print(f"gpu_check: error: cannot prepare {args.prepare_carry}: {exc}", file=sys.stderr)
            return 2
        return 0
    carry = args.carry if args.carry is not None else (DEFAULT_CARRY if DEFAULT_CARRY.is_dir() else None)
    if carry is not None and not carry.is_dir():
        print(f"gpu_check: error: --carry {carry} is not a folder (make it with --prepare-carry)", file=sys.stderr)
        return 2
    carry = None if carry is None else carry.resolve()
    blocked = tuple(m.strip() for m in args.block_modules.split(",") if m.strip())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"gpu_tests", "attention", "engine"}
    if unknown:
        print(f"gpu_check: error: unknown --skip step(s) {', '.join(sorted(unknown))}; "
              "use gpu_tests, attention, engine", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    block_modules(blocked, None if carry is None else str(carry))
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}) "
              "sees none; run it on a CUDA machine, or pass --allow-cpu for a dry run", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    presets = [p for p in (args.presets or ("default,wan-1.3b:flex" if device == "cuda" else "test")).split(",") if p]
    budget = Budget(args.budget_s, time.perf_counter())
    summary: dict[str, Any] = {"check": "gpu_check", "mode": "cuda" if device == "cuda" else "cpu dry run",
                               "environment": environment(blocked), "budget_s": args.budget_s, "steps": {},
                               "carry": None if carry is None else json.loads((carry / "CARRY.json").read_text())
                               if (carry / "CARRY.json").is_file() else str(carry)}
    steps = summary["steps"]
    if "gpu_tests" not in skip:
        steps["gpu_tests"] = run_pytest(["-m", "gpu", "tests"], blocked, budget.limit(150), carry)
    if "attention" not in skip:
        steps["attention_parity"] = run_pytest(["tests/attention"], blocked, budget.limit(150), carry)
    if "engine" not in skip:
        for run in presets:
            preset, _, attention = run.partition(":")
            # wan-1.3b's KV is ~288 MiB per latent frame in bf16: room for 4 streams' windows and the 21-frame run.
            kv_mb = 24576 if preset == "wan-1.3b" else 256
            steps[f"engine_{preset}" + (f"_{attention}" if attention else "")] = run_engine_benchmark(
                preset, device, blocked, budget.limit(240), kv_mb, attention or "sdpa")
    summary["elapsed_s"] = round(time.perf_counter() - budget.t0, 1)
    summary["ok"] = all(step["ok"] for step in steps.values())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
