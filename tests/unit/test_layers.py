"""The layers hold: import-linter's contracts (pyproject.toml ``[tool.importlinter]``) are kept, and the
tests speak the wire (none imports an API's routes)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The modules of an API package that serve routes; tests reach them only through a server.
ROUTE_MODULES = ("routes", "websocket", "rest")
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def test_import_contracts_are_kept():
    """lint-imports over this checkout's src: the layers, the APIs' independence, the engine behind
    speech and the APIs imported by the app alone; a broken contract fails with its report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", LINT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout, result.stdout


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_no_test_imports_an_api_route_module():
    """Tests drive routes through real servers and clients; an API's messages and sessions may be
    unit-tested, its route modules never imported."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[:2] == ["csmserve", "api"] and len(parts) >= 4 and parts[3] in ROUTE_MODULES:
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []
