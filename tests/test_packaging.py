"""The wheel: built (through the sdist, as ``python -m build`` does) from a copy of the sources without
generated stubs, it carries the stubs and the .proto, declares the trainer's packages only under the
``train`` extra, and, installed into a fresh virtualenv, imports its API and serves ``streamgen info``
and ``streamgen generate`` with no source tree on the path.

The build calls the PEP 517 backend of pyproject.toml without isolation (the build requirements are
the project venv's own: setuptools, grpcio-tools), so the test needs no network; it is what
``pip wheel --no-build-isolation`` does minus pip's own start-up (5 s against 13 s on a loaded 2-core
machine). The fresh venv gets the wheel with ``pip install --no-deps --no-index``; a ``.pth`` line
appends the project venv's site-packages for the third-party dependencies (torch is not installed
twice). A path added that way does not run the ``.pth`` files inside it, so the project's editable
install stays inactive there: streamgen can only come from the wheel, which the tests assert through
``streamgen.__file__``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

from streamgen.api import build as api_build
from streamgen.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What a clean clone holds that the wheel is built from (tests, docs and checkpoints are not packaged).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "protos", "streamgen", "trainer", "clients")
PROTO = "streamgen/v1/streamgen.proto"
STUBS = ("streamgen/api/v1/streamgen_pb2.py", "streamgen/api/v1/streamgen_pb2_grpc.py",
         "streamgen/api/v1/streamgen_pb2.pyi")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# A PEP 517 front end without isolation: sdist from the source copy, then the wheel from the unpacked sdist.
_BUILD = """
import importlib, os, sys, tarfile
backend = importlib.import_module(sys.argv[1])
dist = os.path.abspath("../dist")
sdist = backend.build_sdist(dist)
with tarfile.open(os.path.join(dist, sdist)) as tf:
    tf.extractall("..", filter="data")
os.chdir(os.path.join("..", sdist.removesuffix(".tar.gz")))
print(sdist, backend.build_wheel(dist))
"""


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    python: Path
    streamgen: Path  # the console script
    site: Path       # the fresh venv's site-packages
    work: Path       # an empty cwd: nothing of the checkout is importable from there


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """sdist and wheel of a clean copy of the sources: no generated stubs, no caches, no build output."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    assert not list((src / "streamgen" / "api").rglob("*_pb2*")), "the copy must not hold stubs"
    sdist, wheel = _run([sys.executable, "-c", _BUILD, PROJECT["build-system"]["build-backend"]], cwd=src,
                        timeout_s=300).stdout.split()[-2:]
    return Built(sdist=root / "dist" / sdist, wheel=root / "dist" / wheel)


@pytest.fixture(scope="module")
def wheel(built: Built) -> Path:
    return built.wheel


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=root)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = root / "work"
    work.mkdir()
    return Installed(python=python, streamgen=venv / "bin" / "streamgen", site=site, work=work)


def test_sdist_carries_the_proto_and_the_build_step_but_no_stubs(built: Built) -> None:
    with tarfile.open(built.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {f"protos/{PROTO}", "setup.py", "MANIFEST.in", "pyproject.toml"} <= names
    assert not [n for n in names if "_pb2" in n]


def test_wheel_ships_fresh_stubs_and_the_proto(wheel: Path) -> None:
    proto = (REPO / "protos" / PROTO).read_bytes()
    digest = hashlib.sha256(proto).hexdigest()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read(f"streamgen/api/{api_build.PACKAGED_PROTOS}/{PROTO}") == proto
        for stub in STUBS:
            text = zf.read(stub).decode()
            assert text.startswith(f"{api_build.STAMP_PREFIX}{digest}\n"), stub  # generated from this proto
        assert "from streamgen.api.v1 import streamgen_pb2" in zf.read(STUBS[1]).decode()
    assert {"clients/webrtc/static/index.html", "trainer/__init__.py", "streamgen/cli.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "protos/", "checkpoints/")) or "__pycache__" in n]


def test_wheel_metadata_keeps_training_packages_in_the_train_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
        entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Version"] == PROJECT["project"]["version"]
    requires = meta.get_all("Requires-Dist")
    runtime = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if ";" not in r}
    train = {r.split(">")[0].split("=")[0].strip() for r in requires if "extra == \"train\"" in r}
    assert {"accelerate", "tensorboard", "matplotlib"} <= train
    assert not train & runtime and "grpcio-tools" not in runtime
    assert {"torch", "grpcio", "protobuf", "prometheus-client"} <= runtime
    assert "train" in meta.get_all("Provides-Extra")
    assert "streamgen = streamgen.cli:main" in entry_points


def test_build_pin_matches_the_runtime_floors_and_the_gpu_image() -> None:
    """Stubs made by grpcio-tools X demand grpcio >= X at import: the build pin and the runtime floor move together."""
    (tools,) = [r for r in PROJECT["build-system"]["requires"] if r.startswith("grpcio-tools")]
    pinned = tools.split("==")[1]
    assert f"grpcio>={pinned}" in PROJECT["project"]["dependencies"]
    assert f'pip install "grpcio-tools=={pinned}"' in (REPO / "Dockerfile").read_text()


def test_installed_wheel_imports_its_own_api_and_knows_its_version(installed: Installed) -> None:
    # Only the API here (grpc + protobuf, about a second); the slow test below runs the torch side.
    code = ("import streamgen, streamgen.api.v1 as v1, streamgen.api.build as b; "
            "print(streamgen.__file__, v1.pb.__file__, v1.pb_grpc.__file__, b.proto_root(), v1.SERVICE_NAME)")
    *paths, service = _run([str(installed.python), "-c", code], cwd=installed.work).stdout.split()
    assert all(Path(p).is_relative_to(installed.site) for p in paths), paths  # the wheel's files, not the checkout's
    assert (Path(paths[-1]) / PROTO).read_bytes() == (REPO / "protos" / PROTO).read_bytes()
    assert service == "streamgen.v1.StreamGen"
    version = _run([str(installed.streamgen), "--version"], cwd=installed.work).stdout.strip()
    assert version == f"streamgen {PROJECT['project']['version']}"


@pytest.mark.slow  # two CLI runs, each loading torch and the prompt encoder: 45-75 s on a loaded 2-core machine
def test_installed_wheel_serves_info_and_generate(installed: Installed) -> None:
    info = _run([str(installed.streamgen), "info", "--preset", "test"], cwd=installed.work).stdout
    assert '"name": "test"' in info
    out = installed.work / "clip.mp4"
    _run([str(installed.streamgen), "generate", "--preset", "test", "--random-init", "--prompt",
          "a red mug on a table", "--num-frames", "8", "--out", str(out), "--no-progress", "--dtype", "float32",
          "--threads", "1"], cwd=installed.work)
    assert read_video(out).shape == (8, 32, 32, 3)
