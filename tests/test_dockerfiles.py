"""Dockerfile (CUDA) and Dockerfile.cpu, checked as text: no Docker engine runs here, so these tests hold
the files to what docs/serving.md promises (non-root user, a HEALTHCHECK that probes the served port,
``streamgen serve`` with flags that exist, build inputs that exist and are not docker-ignored)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from streamgen.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def _instructions(name: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction, continuation lines joined, comments dropped."""
    text = (REPO / name).read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for line in logical.splitlines() if line.strip() for parts in [line.strip().split(None, 1)]]


def _final_stage(name: str) -> list[tuple[str, str]]:
    instructions = _instructions(name)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_streamgen_serve_as_a_non_root_user(name: str) -> None:
    stage = _final_stage(name)
    users = [args for op, args in stage if op == "USER"]
    assert users == ["streamgen"]
    created = " ".join(args for op, args in stage if op == "RUN")
    assert re.search(r"useradd [^&]*--uid 10001\b[^&]* streamgen\b", created), "the user is created in the run stage"
    entrypoint = _exec_form(next(args for op, args in stage if op == "ENTRYPOINT"))
    cmd = _exec_form(next(args for op, args in stage if op == "CMD"))
    assert entrypoint[:2] == ["streamgen", "serve"]
    args = build_parser().parse_args(entrypoint[1:] + cmd)  # every flag exists (a rename breaks this test)
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 50051, 9090)
    exposed = {int(p) for op, line in stage if op == "EXPOSE" for p in line.split()}
    assert exposed == {args.port, args.metrics_port}
    assert ("STOPSIGNAL", "SIGTERM") in stage  # SIGTERM drains


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_probes_the_served_port_with_real_flags(name: str) -> None:
    stage = _final_stage(name)
    (check,) = [args for op, args in stage if op == "HEALTHCHECK"]
    options, _, command = check.partition("CMD")
    assert "--interval=" in options and "--start-period=" in options
    probe = _exec_form(command.strip())
    assert probe[:3] == ["python", "-m", "streamgen.server.health"]
    assert probe[probe.index("--address") + 1] == "127.0.0.1:50051"
    # The probe's flags exist: against a closed port it runs and reports "not serving" (exit 1), not a usage error.
    closed = [a if a != "127.0.0.1:50051" else "127.0.0.1:1" for a in probe[3:]]
    res = subprocess.run([sys.executable, "-m", "streamgen.server.health", *closed], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert res.returncode == 1 and "usage:" not in res.stderr


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, a pattern also covers what lies below it."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if fnmatch(path, body) or path.startswith(body.rstrip("/") + "/"):
            ignored = not negated
    return ignored


def test_docker_ignore_rule() -> None:
    patterns = ["runs", "checkpoints/*", "!checkpoints/keep.safetensors"]
    assert _docker_ignored("runs/x/y.pt", patterns) and _docker_ignored("checkpoints/teacher.safetensors", patterns)
    assert not _docker_ignored("checkpoints/keep.safetensors", patterns)
    assert not _docker_ignored("streamgen/cli.py", patterns)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_inputs_exist_and_are_not_docker_ignored(name: str) -> None:
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for op, args in _instructions(name):
        if op != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
            assert not _docker_ignored(source, ignored), f"{name}: {source} is docker-ignored"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_serves_the_committed_default_model(name: str) -> None:
    """The runtime stage bakes in the student and VAE where ``$STREAMGEN_CHECKPOINTS`` points, and its
    default command serves them (no --random-init)."""
    from streamgen import default_model

    stage = _final_stage(name)
    copied = [shlex.split(args) for op, args in stage if op == "COPY" and not args.startswith("--from=")]
    env = " ".join(args for op, args in stage if op == "ENV")
    directory = re.search(rf"{default_model.ENV_DIR}=(\S+)", env)
    assert directory is not None, f"{name}: no ENV {default_model.ENV_DIR}"
    wanted = {f"checkpoints/{default_model.STUDENT_FILE}", f"checkpoints/{default_model.VAE_FILE}"}
    assert any(wanted <= set(c[:-1]) and c[-1].rstrip("/") == directory.group(1) for c in copied), copied
    model_json = f"checkpoints/{default_model.MODEL_DIR}/model.json"  # the same model as a --model directory
    assert any(model_json in c[:-1] and c[-1].rstrip("/") == f"{directory.group(1)}/{default_model.MODEL_DIR}"
               for c in copied), copied
    cmd = _exec_form(next(args for op, args in stage if op == "CMD"))
    assert "--random-init" not in cmd and "--transformer" not in cmd


def test_gpu_image_installs_the_gpu_extra_and_cpu_image_the_cpu_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras
    gpu_runs = " ".join(args for op, args in _instructions("Dockerfile") if op == "RUN")
    assert 'pip install --no-build-isolation ".[gpu]"' in gpu_runs
    cpu_runs = " ".join(args for op, args in _instructions("Dockerfile.cpu") if op == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_runs and "[gpu]" not in cpu_runs


def test_gpu_image_serves_on_the_gpu_it_is_given() -> None:
    """``--device auto`` in the CUDA image's entry point: cuda:0 under ``docker run --gpus``."""
    stage = _final_stage("Dockerfile")
    entrypoint = _exec_form(next(args for op, args in stage if op == "ENTRYPOINT"))
    cmd = _exec_form(next(args for op, args in stage if op == "CMD"))
    assert build_parser().parse_args(entrypoint[1:] + cmd).device == "auto"
