"""Build step of the streamgen package: the gRPC stubs are generated while the package is built.

Everything else about the package is declared in pyproject.toml. The stubs are build output
(git-ignored), so a wheel built from a clean clone must make them itself: ``build_py`` runs
``streamgen/api/build.py`` (standard library + grpcio-tools, a build requirement) and writes the
stubs and a copy of ``protos/`` into the build directory, where the wheel picks them up. An
editable install imports from the source tree instead, so there the stubs are generated in place
(as ``make proto`` does).

``streamgen/api/build.py`` is loaded by path: importing the ``streamgen`` package here would need
its runtime dependencies, which a build environment does not have.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _api_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_streamgen_api_build", ROOT / "streamgen" / "api" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """``build_py`` that also generates the gRPC stubs (and packages the .proto)."""

    def run(self) -> None:
        api = _api_build()
        if self.editable_mode:
            api.ensure()  # the editable install imports the source tree's stubs
        super().run()
        if not self.editable_mode:
            api.build_into(Path(self.build_lib) / "streamgen" / "api")


setup(cmdclass={"build_py": BuildPyWithStubs})
