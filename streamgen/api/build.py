"""Generate the Python gRPC stubs from ``protos/`` into ``streamgen/api/<version>/``.

Usage (any of these; all are the same code)::

    make proto
    python -m streamgen.api.build [--check] [--force]
    python streamgen/api/build.py          # before streamgen's own dependencies are installed
    pip install . / pip wheel .            # setup.py's build step: stubs + proto into the wheel

protoc (from ``grpcio-tools``) writes ``streamgen/v1/streamgen_pb2*.py`` for the proto's import
path ``streamgen/v1/streamgen.proto``. That path stays the descriptor's file name (reflection and
``grpcurl`` show it), but the generated ``_pb2_grpc.py`` would import ``streamgen.v1``, which is
not a module here, so the files are written to ``streamgen/api/v1/`` and that one import line is
rewritten to ``streamgen.api.v1``. The first line of each generated file records the proto's
SHA-256, so stale stubs are detected and rebuilt.

A wheel is built by ``setup.py``, which loads this file by path and calls :func:`build_into` on
the build directory: the stubs and a copy of ``protos/`` (under ``streamgen/api/protos/``, for
tools that want the .proto; see :func:`proto_root`) ship inside the package, and an installed
streamgen never needs ``protos/`` or grpcio-tools.

This module must stay importable and runnable with only the standard library and grpcio-tools
(no streamgen, torch or numpy imports): the build step runs it before streamgen's own dependencies
are installed. It never writes anywhere but ``streamgen/api/`` (of the source tree or of a build
directory).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
REPO_ROOT = API_DIR.parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
# Where a built package keeps its copy of protos/ (relative to streamgen/api/).
PACKAGED_PROTOS = "protos"
# (proto path under protos/, package directory under streamgen/api/)
PROTOS: tuple[tuple[str, str], ...] = (("streamgen/v1/streamgen.proto", "v1"),)
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
STAMP_PREFIX = "# proto-sha256: "


def _proto_digest(proto: str) -> str:
    return hashlib.sha256((PROTO_ROOT / proto).read_bytes()).hexdigest()


def _outputs(proto: str, package: str, api_dir: Path = API_DIR) -> list[Path]:
    stem = Path(proto).stem
    return [api_dir / package / f"{stem}{suffix}" for suffix in SUFFIXES]


def _recorded_digest(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    return first[len(STAMP_PREFIX):].strip() if first.startswith(STAMP_PREFIX) else None


def stale(proto: str, package: str) -> bool:
    """True if any stub of ``proto`` is missing or was generated from a different proto text."""
    digest = _proto_digest(proto)
    return any(_recorded_digest(p) != digest for p in _outputs(proto, package))


def have_sources() -> bool:
    """True in a source checkout (protos/ present); False in an installed wheel."""
    return all((PROTO_ROOT / proto).is_file() for proto, _ in PROTOS)


def proto_root() -> Path:
    """The directory to pass to ``protoc -I`` / ``grpcurl -import-path``: ``protos/`` of a source
    checkout, else the copy an installed wheel ships under ``streamgen/api/protos/``."""
    return PROTO_ROOT if have_sources() else API_DIR / PACKAGED_PROTOS


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise concurrent generators (e.g. several test subprocesses importing at once)."""
    import fcntl

    key = hashlib.sha256(str(API_DIR).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"streamgen-api-{key}.lock"
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _generate_one(proto: str, package: str, api_dir: Path = API_DIR) -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("grpcio-tools is needed to generate the gRPC stubs: pip install grpcio-tools") from exc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    digest = _proto_digest(proto)
    src_pkg = str(Path(proto).parent).replace("/", ".")  # streamgen.v1
    dst_pkg = f"streamgen.api.{package}"
    with tempfile.TemporaryDirectory(prefix="streamgen-protoc-") as tmp:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
        out_dir = api_dir / package
        out_dir.mkdir(parents=True, exist_ok=True)
        for target in _outputs(proto, package, api_dir):
            text = (Path(tmp) / Path(proto).parent / target.name).read_text(encoding="utf-8")
            text = text.replace(f"from {src_pkg} import ", f"from {dst_pkg} import ")
            staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.write_text(f"{STAMP_PREFIX}{digest}\n{text}", encoding="utf-8")
            os.replace(staged, target)  # atomic: an importer never sees half a file


def ensure(force: bool = False) -> list[str]:
    """Generate every stale (or, with ``force``, every) stub; returns the protos regenerated.

    In an installed package without ``protos/`` this only checks that the stubs exist.
    """
    if not have_sources():
        missing = [str(p) for proto, pkg in PROTOS for p in _outputs(proto, pkg) if not p.exists()]
        if missing:
            raise ImportError(f"generated gRPC stubs are missing ({', '.join(missing)}) and protos/ is not "
                              f"available to build them: build streamgen from a source checkout")
        return []
    todo = [(proto, pkg) for proto, pkg in PROTOS if force or stale(proto, pkg)]
    if not todo:
        return []
    with _lock():
        done = []
        for proto, pkg in todo:
            if force or stale(proto, pkg):  # another process may have built it while we waited
                _generate_one(proto, pkg)
                done.append(proto)
        return done


def build_into(api_dir: Path) -> list[Path]:
    """Write fresh stubs of every proto and a copy of each .proto into ``api_dir``, the
    ``streamgen/api/`` of a build directory (setup.py's build step); returns the files written.

    Always regenerates: a build must not trust stubs lying in the source tree, which may come from
    another grpcio-tools than the one this build runs with.
    """
    if not have_sources():
        raise RuntimeError(f"{PROTO_ROOT} is missing: a wheel is built from a source checkout or an sdist")
    written: list[Path] = []
    for proto, pkg in PROTOS:
        _generate_one(proto, pkg, api_dir)
        written += _outputs(proto, pkg, api_dir)
        copy = api_dir / PACKAGED_PROTOS / proto
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes((PROTO_ROOT / proto).read_bytes())
        written.append(copy)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate streamgen's gRPC stubs from protos/ into streamgen/api/.")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if any stub is missing or stale")
    parser.add_argument("--force", action="store_true", help="regenerate even if the stubs are up to date")
    args = parser.parse_args(argv)
    if args.check:
        bad = [proto for proto, pkg in PROTOS if stale(proto, pkg)]
        for proto in bad:
            print(f"stale or missing stubs for {proto}", file=sys.stderr)
        return 1 if bad else 0
    done = ensure(force=args.force)
    for proto in done:
        print(f"proto: generated stubs for {proto} in {API_DIR.relative_to(REPO_ROOT)}/")
    if not done:
        print("proto: stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
