"""A seed fixes a run: the same scenario twice leaves byte-identical ledgers.

Also across processes with different ``PYTHONHASHSEED`` (so nothing may depend on
the iteration order of a set of strings), and a different seed gives a different
run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing

from ledger import audit
from ledger.scan import LogReader
from sims.host import EPOCH_NS
from sims.node import build_node
from sims.scenario import Scenario, ScenarioReport, run_scenario

SEED = 2024
ROOT = Path(__file__).resolve().parents[2]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def quiet_run(directory: Path, seed: int) -> ScenarioReport:
    with structlog.testing.capture_logs():
        return run_scenario(directory, seed)


def test_same_seed_gives_identical_bytes_and_root(tmp_path: Path) -> None:
    a, b = quiet_run(tmp_path / "a", SEED), quiet_run(tmp_path / "b", SEED)
    assert a.root == b.root and a.size == b.size and a == b
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert [n for n in fa if n.startswith("seg-")], fa.keys()
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between two runs of seed {SEED}"


def test_same_seed_in_another_process_with_another_hash_seed(tmp_path: Path) -> None:
    here = quiet_run(tmp_path / "here", SEED)
    code = ("import sys, structlog.testing; from pathlib import Path; "
            "from sims.scenario import run_scenario\n"
            "with structlog.testing.capture_logs():\n"
            "    r = run_scenario(Path(sys.argv[1]), int(sys.argv[2]))\n"
            "print(r.root.hex())")
    for hash_seed in ("1", "4242"):
        there = tmp_path / f"there-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, str(there), str(SEED)], cwd=ROOT,
                             env=env, capture_output=True, check=True, timeout=120)
        assert out.stdout.decode().strip() == here.root.hex()
        assert files(there) == files(tmp_path / "here")


def test_different_seed_gives_a_different_run(tmp_path: Path) -> None:
    a, b = quiet_run(tmp_path / "a", SEED), quiet_run(tmp_path / "b", SEED + 1)
    assert a.root != b.root
    assert files(tmp_path / "a") != files(tmp_path / "b")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_run_is_a_sound_ledger_with_virtual_timestamps(tmp_path: Path, seed: int) -> None:
    with structlog.testing.capture_logs():
        node = build_node(tmp_path / "ledger", seed)
        report = Scenario(node, seed).run(300)
        live = node.kernel.state.to_obj()
        # Every refusal is counted: the scenario's own tries and the cores' actions.
        assert sum(node.kernel.refused.values()) == (sum(report.refused.values())
                                                     + len(node.host.refusals))
        node.close()
    verified = audit.verify(tmp_path / "ledger")
    assert verified.records == report.size and verified.root == report.root
    assert audit.state_at(tmp_path / "ledger").to_obj() == live
    stamps = [e.ts_ns for e in LogReader(tmp_path / "ledger").entries()]
    assert stamps == sorted(stamps)
    assert stamps[0] >= EPOCH_NS and stamps[-1] <= EPOCH_NS + round(report.elapsed * 1e9)
    # The scenario does what it says: every kind of step, and refusals of several kinds.
    assert {"mint", "copy", "transfer", "move", "delete", "revoke", "ping", "send"} <= set(
        report.done)
    assert len(report.refused) >= 4 and report.handled > 100
    assert report.summary().startswith(f"seed {seed}: 300 steps")
