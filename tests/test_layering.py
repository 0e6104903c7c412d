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


CORE_FORBIDDEN = {"pykka", "threading", "asyncio", "socket", "subprocess", "pyroute2", "qemu",
                  "selectors", "multiprocessing", "concurrent", "os", "time"}


def _reachable(path: Path, seen: set[Path]) -> set[str]:
    """Top-level modules imported by ``path`` and by every project module it imports."""
    if path in seen:
        return set()
    seen.add(path)
    mods: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                 and node.level == 0 else [])
        for name in names:
            mods.add(name.split(".")[0])
            target = ROOT / (name.replace(".", "/") + ".py")
            package = ROOT / name.replace(".", "/") / "__init__.py"
            for f in (target, package):
                if f.is_file() and name.split(".")[0] == "actors":
                    mods |= _reachable(f, seen)
    return mods


@pytest.mark.parametrize("core", sorted(p.name for p in (ROOT / "actors" / "pds").glob("*.py")))
def test_cores_are_sans_io(core: str) -> None:
    """A PD core imports no threads, sockets, processes, netlink or QEMU, not even through
    the runtime modules it uses: it is the same code on a node and in the simulator.
    (What it uses of ``ledger`` is pure by test_ledger_has_no_threads_or_sockets.)"""
    found = _reachable(ROOT / "actors" / "pds" / core, set()) & CORE_FORBIDDEN
    assert found == set(), f"actors/pds/{core} reaches {sorted(found)}"
