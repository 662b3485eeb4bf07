"""The layers stay layered: the gRPC server never loads a model itself (streamgen.engine.factory does),
and the scheduler's side of a session needs no tensors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_server_package_never_imports_the_model_or_its_weights() -> None:
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p)
                                                  if m.startswith(("streamgen.model", "streamgen.model_dir")))
                 for p in sorted((REPO / "streamgen" / "server").glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_scheduler_and_session_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "import streamgen.engine.scheduler, streamgen.engine.session\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
