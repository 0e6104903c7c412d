"""DESIGN.md's import direction: ledger imports neither actors nor sims; actors never sims."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"ledger": {"actors", "sims"}, "actors": {"sims"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def test_ledger_has_no_threads_or_sockets() -> None:
    for f in sorted((ROOT / "ledger").rglob("*.py")):
        mods = _imports(f)
        assert not mods & {"socket", "asyncio", "selectors", "pykka"}, f
        assert "threading.Thread" not in f.read_text(), f


def test_no_ambient_authority_through_pykka_registry() -> None:
    """No code finds an actor by name: PDs reach each other only through the kernel."""
    for package in ("actors", "sims", "ledger"):
        for f in sorted((ROOT / package).rglob("*.py")):
            assert "ActorRegistry" not in f.read_text(), f
