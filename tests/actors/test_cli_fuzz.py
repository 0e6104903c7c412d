"""Fuzzing ``ppn ledger``: damaged ledger files never give a traceback, a hang or exit 0.

Each case copies one multi-segment ledger, damages one file of the copy -- random
bytes, a truncation, a deletion, or a special file in its place (FIFO, directory,
symlink loop, 64 GiB sparse file) -- and runs every ``ppn ledger`` command over it
(``check-proof`` gets the same treatment of its proof and checkpoint files).  Every
command must

* neither hang (:data:`TIMEOUT`; a FIFO open nobody will answer counts at once) nor
  print a traceback;
* exit 0, 1 or 2, and on failure say so in one line: the last stderr line starts
  with ``ppn:`` or stdout's last line with ``FAILED:`` (stderr: a few lines at most);
* never exit 0 over a damaged ledger.  Damage to a segment or the ``checkpoint``
  anchor fails every command; damage to ``nodes.jsonl`` or a snapshot fails
  ``verify``, while the commands that do not read those files print what they print
  for the undamaged ledger.  Not damage: a deleted snapshot (an optional cache), a
  mutation that leaves the file as it was (skipped), and zeros after the last
  segment's data (the writer's space reserved ahead of its appends: a command may
  accept it, but then says what it says of the undamaged ledger).

The commands run as separate processes of the repository this file lives in (see
``fuzz_cases``: forked from one warm interpreter; ``PPN_FUZZ_SPAWN=1`` starts a real
``python -m actors.cli`` per command).  ``PPN_FUZZ_REPORT=FILE`` appends one JSON
line per command run to FILE; ``PPN_FUZZ_TIMEOUT`` sets the hang timeout (seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.actors.fuzz_cases import (
    MUTATIONS,
    ForkServer,
    Outcome,
    Spawner,
    line_ends,
    mutate,
)

pytestmark = pytest.mark.slow  # ~35 s on 2 CPUs, more while commands hang (~70 s at aef9ffb)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = float(os.environ.get("PPN_FUZZ_TIMEOUT", "10"))
MAX_STDERR_LINES = 5
LEDGER_FILES = ("seg-first", "seg-middle", "seg-last", "checkpoint", "nodes.jsonl", "snapshot")
PROOF_FILES = ("inclusion.json", "consistency.json", "checkpoint.note", "old-checkpoint.note")

BUILD = r'''
import dataclasses, json, os, sys
from pathlib import Path
from ledger.catalog import CapGranted, MemberAdded, MemberRemoved, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.records import FRAME_HEADER, KIND_CHECKPOINT, SEGMENT_HEADER
from ledger.scan import LogReader, list_segments

state = Path(sys.argv[1])
directory = state / "ledger"
wanted = dict(segment_bytes=4096, set_append_only_flag=False, snapshot_every=10,
              keep_snapshots=2)
known = {f.name for f in dataclasses.fields(Options)}
options = Options(**{k: v for k, v in wanted.items() if k in known})


def events(lo, hi):
    for i in range(lo, hi):
        if i % 25 == 3:
            yield MemberAdded(f"peer-{i}", bytes([i]) * 32, bytes([(7 * i + 1) % 256]) * 32,
                              f"10.8.0.{i % 250 + 2}", f"192.0.2.{i % 250 + 1}:51820", "node")
        elif i % 50 == 40:
            yield MemberRemoved(f"peer-{i - 37}", "left")
        elif i % 10 == 6:
            yield CapGranted(1000 + i, "pd-fleet", "tunnel", ("read",), i, None, "mint")
        else:
            yield PdDeclared(f"pd-fuzz-{i}", i)


def append(ledger, evs):
    evs, i = list(evs), 0
    while i < len(evs):
        n = 3 if i % 7 == 0 else 1  # mostly a commit per record, some batches of three
        ledger.append_many(evs[i:i + n])
        i += n


ledger = Ledger.open(directory, NodeKeys.load(state), options=options)
append(ledger, events(0, 100))
ledger.write_snapshot()
append(ledger, events(100, 200))
ledger.write_snapshot()
ledger.close()

segments = [p for _, p in list_segments(directory)]
snapshots = sorted(p for p in (directory / "snapshots").iterdir())
boundaries = {}
for p in [*segments, *snapshots]:
    os.chmod(p, 0o644)  # sealed segments and snapshots are 0444; root writes them anyway
for p in segments:
    data, ends, off = p.read_bytes(), [], SEGMENT_HEADER.size
    while off + FRAME_HEADER.size < len(data):
        end = off + FRAME_HEADER.size + FRAME_HEADER.unpack_from(data, off)[0]
        if data[off + FRAME_HEADER.size] == KIND_CHECKPOINT:
            ends.append(end)
        off = end
    boundaries[p.name] = ends
reader = LogReader(directory)
reader.run()
sizes = list(reader.result.notes)
print(json.dumps({"size": reader.result.size, "old_size": sizes[len(sizes) // 3],
                  "segments": [p.name for p in segments],
                  "snapshots": [p.name for p in snapshots], "boundaries": boundaries}))
'''


# ----------------------------------------------------------------------------- fixtures
Runner = ForkServer | Spawner


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    work = tmp_path_factory.mktemp("fuzz-runner")
    r: Runner = (Spawner(ROOT, work) if os.environ.get("PPN_FUZZ_SPAWN") == "1"
                 else ForkServer(ROOT, work))
    try:
        assert r.cli_file.resolve().is_relative_to(ROOT), (
            f"ppn runs {r.cli_file}, not the code of {ROOT}")
        yield r
    finally:
        r.close()


@dataclass(frozen=True)
class Base:
    ledger: Path
    info: dict[str, Any]
    proofs: Path
    key: str
    baseline: dict[str, Outcome]
    proof_baseline: dict[str, Outcome]

    def path_of(self, ledger: Path, name: str) -> Path:
        segs = self.info["segments"]
        if name.startswith("seg-"):
            pick = {"seg-first": 0, "seg-middle": len(segs) // 2, "seg-last": -1}[name]
            return ledger / str(segs[pick])
        if name == "snapshot":
            return ledger / "snapshots" / str(self.info["snapshots"][-1])
        return ledger / name

    def boundaries(self, path: Path, data: bytes) -> list[int]:
        if path.name in self.info["boundaries"]:
            return list(self.info["boundaries"][path.name])
        return line_ends(data) if not path.name.endswith(".bin") else []


def ledger_commands(d: Path, info: dict[str, Any]) -> dict[str, list[str]]:
    """Every ``ppn ledger`` command that reads a ledger directory, by label."""
    old, new = str(info["old_size"]), str(info["size"])
    return {
        "verify": ["ledger", "verify", str(d)],
        "verify --jobs 1": ["ledger", "verify", str(d), "--jobs", "1"],
        "show": ["ledger", "show", str(d)],
        "show --json": ["ledger", "show", str(d), "--json"],
        "state": ["ledger", "state", str(d)],
        "state --json": ["ledger", "state", str(d), "--json"],
        "checkpoint": ["ledger", "checkpoint", str(d)],
        "prove 3": ["ledger", "prove", str(d), "3"],
        f"prove --consistency {old} {new}": ["ledger", "prove", str(d), "--consistency",
                                              old, new],
        "pubkey": ["ledger", "pubkey", str(d)],
    }


PROOF_READS = {
    "check-proof inclusion": ("inclusion.json", "checkpoint.note"),
    "check-proof consistency": ("consistency.json", "checkpoint.note", "old-checkpoint.note"),
}


def proof_commands(p: Path, key: str) -> dict[str, list[str]]:
    return {
        "check-proof inclusion": ["ledger", "check-proof", str(p / "inclusion.json"),
                                  "--checkpoint", str(p / "checkpoint.note"), "--key", key],
        "check-proof consistency": ["ledger", "check-proof", str(p / "consistency.json"),
                                    "--checkpoint", str(p / "checkpoint.note"),
                                    "--old-checkpoint", str(p / "old-checkpoint.note"),
                                    "--key", key],
    }


def run_all(runner: Runner, commands: dict[str, list[str]]) -> dict[str, Outcome]:
    """All commands at once (each in its own process), by label."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {label: pool.submit(runner.run, argv, ROOT, TIMEOUT)
                   for label, argv in commands.items()}
        return {label: f.result() for label, f in futures.items()}


@pytest.fixture(scope="module")
def base(runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Base:
    top = tmp_path_factory.mktemp("fuzz-base")
    state = top / "state"
    init = runner.run(["node", "init", "--state-dir", str(state), "--name", "fuzz-node",
                       "--role", "hub", "--mesh-ip", "10.8.0.1"], ROOT, 60)
    assert init.returncode == 0, f"ppn node init: {init.stderr.decode()}"
    built = subprocess.run([sys.executable, "-c", BUILD, str(state)], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                           timeout=120)
    assert built.returncode == 0, f"building the base ledger: {built.stderr.decode()}"
    info = json.loads(built.stdout)
    ledger = state / "ledger"
    assert len(info["segments"]) >= 5 and info["snapshots"], info
    assert (ledger / "checkpoint").is_file() and (ledger / "nodes.jsonl").is_file()
    baseline = run_all(runner, ledger_commands(ledger, info))
    bad = {k: o for k, o in baseline.items() if o.returncode != 0 or o.stderr}
    assert not bad, "the undamaged ledger: " + "; ".join(
        f"{k}: exit {o.returncode} {o.hung or o.last_stderr_line or o.last_stdout_line}"
        for k, o in bad.items())
    proofs = top / "proofs"
    proofs.mkdir()
    old = runner.run(["ledger", "checkpoint", str(ledger), "--size", str(info["old_size"])],
                     ROOT, TIMEOUT)
    assert old.returncode == 0, old.stderr.decode()
    (proofs / "inclusion.json").write_bytes(baseline["prove 3"].stdout)
    consistency = next(k for k in baseline if k.startswith("prove --consistency"))
    (proofs / "consistency.json").write_bytes(baseline[consistency].stdout)
    (proofs / "checkpoint.note").write_bytes(baseline["checkpoint"].stdout)
    (proofs / "old-checkpoint.note").write_bytes(old.stdout)
    key = baseline["pubkey"].stdout.decode().strip()
    proof_baseline = run_all(runner, proof_commands(proofs, key))
    for label, o in proof_baseline.items():
        assert o.returncode == 0 and o.stdout.startswith(b"ok:"), (
            f"{label} over valid files: exit {o.returncode} {o.last_stderr_line}")
    return Base(ledger, info, proofs, key, baseline, proof_baseline)


# ----------------------------------------------------------------------------- verdicts
_TIMING = re.compile(rb"; [0-9.]+s \([0-9,]+ records/s\)\s*$")


def _comparable(label: str, stdout: bytes) -> bytes:
    """stdout with what legitimately varies between runs (verify's timing) cut off."""
    return _TIMING.sub(b"", stdout) if label.startswith("verify") else stdout


def judge(o: Outcome, label: str, expect: str, undamaged: Outcome,
          damaged: str = "a damaged ledger") -> list[str]:
    """What is wrong with one command's outcome.

    ``expect``: "fail" (the command reads damage: must not exit 0), "same" (it does
    not: exit and stdout as over the undamaged ledger), "same-if-ok" (it may
    accept the change, then with the undamaged ledger's stdout), "any".
    """
    if o.hung is not None:
        return [f"hang: {o.hung}"]
    problems = []
    rc = o.returncode
    if o.traceback:
        problems.append("traceback")
    if rc not in (0, 1, 2):
        sig = f" ({signal.Signals(-rc).name})" if rc is not None and rc < 0 else ""
        problems.append(f"exit code {rc}{sig}, not 0, 1 or 2")
    elif rc != 0 and not o.traceback and not (o.last_stderr_line.startswith("ppn:")
                                              or o.last_stdout_line.startswith("FAILED:")):
        problems.append("failure not reported as one 'ppn: ...' or 'FAILED: ...' line")
    if o.stderr_lines > MAX_STDERR_LINES and not o.traceback:
        problems.append(f"{o.stderr_lines} lines on stderr")
    if expect == "fail" and rc == 0:
        problems.append(f"exit 0 over {damaged}")
    elif expect == "same" and (rc, o.stdout) != (undamaged.returncode, undamaged.stdout):
        problems.append(f"exit {rc} / stdout differ from the undamaged ledger's "
                        f"(exit {undamaged.returncode})")
    elif (expect == "same-if-ok" and rc == 0
          and _comparable(label, o.stdout) != _comparable(label, undamaged.stdout)):
        problems.append("exit 0 with other output than the undamaged ledger's")
    return problems


def _report(case: dict[str, Any], label: str, o: Outcome, expect: str,
            problems: list[str]) -> None:
    path = os.environ.get("PPN_FUZZ_REPORT")
    if not path:
        return
    row = {**case, "command": label, "expect": expect, "exit": o.returncode, "hung": o.hung,
           "traceback": o.traceback, "last_stderr": o.last_stderr_line[:300],
           "last_stdout": o.last_stdout_line[:300], "seconds": round(o.seconds, 3),
           "problems": problems}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def verdicts(case: dict[str, Any], outcomes: dict[str, Outcome], expect: dict[str, str],
             undamaged: dict[str, Outcome], damaged: str = "a damaged ledger") -> list[str]:
    lines = []
    where = f"{case['file']} / {case['mutation']}#{case['seed']}"
    for label, o in outcomes.items():
        problems = judge(o, label, expect[label], undamaged[label], damaged)
        _report(case, label, o, expect[label], problems)
        last = (f"last stderr line: {o.last_stderr_line[:200]!r}" if o.last_stderr_line
                else f"stderr empty, last stdout line: {o.last_stdout_line[:120]!r}")
        lines += [f"{where}: ppn ledger {label}: {p}; exit {o.returncode}; {last}"
                  for p in problems]
    return lines


def _remove(*paths: Path) -> None:
    """Remove copies, FIFOs, loops and 64 GiB files at once (rmtree never follows links)."""
    for p in paths:
        if p.is_symlink() or p.is_fifo() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def ledger_expectation(file: str, mutation: str, label: str) -> str:
    reads_it = file.startswith("seg-") or file == "checkpoint" or label.startswith("verify")
    if file == "seg-last" and mutation == "zeros-64g":
        return "same-if-ok"  # zeros after the data: the writer's reserved space
    if file == "snapshot" and mutation == "delete":
        return "any" if label.startswith("verify") else "same"  # a cache, not the log
    return "fail" if reads_it else "same"


# ----------------------------------------------------------------------------- tests
def test_undamaged_ledger_passes_every_command(base: Base) -> None:
    verify = base.baseline["verify"].stdout.decode()
    assert verify.startswith(f"ok: {base.info['size']} records"), verify
    assert base.baseline["pubkey"].stdout.decode().startswith("fuzz-node.ppn/ledger+")


def test_fork_server_runs_ppn_as_a_real_process_does(base: Base, runner: Runner,
                                                     tmp_path: Path) -> None:
    if not isinstance(runner, ForkServer):
        pytest.skip("commands already run as real processes")
    real = Spawner(ROOT, tmp_path / "spawn")
    copy = tmp_path / "ledger"
    shutil.copytree(base.ledger, copy, symlinks=True)
    try:
        cmds = ledger_commands(copy, base.info)
        cases = [("undamaged", cmds)]
        damaged = tmp_path / "damaged"
        shutil.copytree(base.ledger, damaged, symlinks=True)
        mutate(base.path_of(damaged, "seg-middle"), "sparse-64g", 0, [], tmp_path)
        cases.append(("seg-middle sparse-64g", {k: v for k, v in
                                                ledger_commands(damaged, base.info).items()
                                                if k in ("verify --jobs 1", "show")}))
        for what, commands in cases:
            forked, spawned = run_all(runner, commands), run_all(real, commands)
            for label in commands:
                f, s = forked[label], spawned[label]
                assert (f.returncode, f.traceback, f.last_stderr_line,
                        _comparable(label, f.stdout)) == (
                    s.returncode, s.traceback, s.last_stderr_line,
                    _comparable(label, s.stdout)), f"{what}: {label}"
    finally:
        _remove(tmp_path / "ledger", tmp_path / "damaged")


@pytest.mark.parametrize(("file", "mutation", "seed"), [
    pytest.param(f, m, s, id=f"{f}-{m}-{s}") for f in LEDGER_FILES for m, s in MUTATIONS])
def test_damaged_ledger_file(base: Base, runner: Runner, tmp_path: Path, file: str,
                             mutation: str, seed: int) -> None:
    copy = tmp_path / "ledger"
    shutil.copytree(base.ledger, copy, symlinks=True)
    loops = tmp_path / "loops"
    loops.mkdir()
    try:
        target = base.path_of(copy, file)
        if not mutate(target, mutation, seed, base.boundaries(target, target.read_bytes()),
                      loops):
            pytest.skip(f"{mutation}#{seed} left {target.name} unchanged")
        commands = ledger_commands(copy, base.info)
        outcomes = run_all(runner, commands)
        expect = {label: ledger_expectation(file, mutation, label) for label in commands}
        problems = verdicts({"file": file, "mutation": mutation, "seed": seed}, outcomes,
                            expect, base.baseline)
    finally:
        _remove(copy, loops)
    assert not problems, "\n".join(problems)


def _json_equivalent(a: bytes, b: bytes) -> bool:
    """Whether two proof files say the same (hex digits in either case)."""
    def canon(x: Any) -> Any:
        if isinstance(x, str):
            return x.lower()
        if isinstance(x, list):
            return [canon(v) for v in x]
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items()}
        return x
    try:
        return bool(canon(json.loads(a)) == canon(json.loads(b)))
    except (ValueError, UnicodeDecodeError):
        return False


def proof_expectation(file: str, label: str, original: bytes, target: Path) -> str:
    if file not in PROOF_READS[label]:
        return "same"
    if (file.endswith(".json") and target.is_file() and not target.is_symlink()
            and target.stat().st_size < 1 << 20
            and _json_equivalent(original, target.read_bytes())):
        return "any"
    return "fail"


@pytest.mark.parametrize(("file", "mutation", "seed"), [
    pytest.param(f, m, s, id=f"{f}-{m}-{s}") for f in PROOF_FILES for m, s in MUTATIONS])
def test_damaged_proof_file(base: Base, runner: Runner, tmp_path: Path, file: str,
                            mutation: str, seed: int) -> None:
    proofs = tmp_path / "proofs"
    shutil.copytree(base.proofs, proofs, symlinks=True)
    loops = tmp_path / "loops"
    loops.mkdir()
    try:
        target = proofs / file
        original = target.read_bytes()
        if not mutate(target, mutation, seed, line_ends(original), loops):
            pytest.skip(f"{mutation}#{seed} left {file} unchanged")
        commands = proof_commands(proofs, base.key)
        outcomes = run_all(runner, commands)
        expect = {label: proof_expectation(file, label, original, target)
                  for label in commands}
        problems = verdicts({"file": file, "mutation": mutation, "seed": seed}, outcomes,
                            expect, base.proof_baseline, f"a damaged {file}")
    finally:
        _remove(proofs, loops)
    assert not problems, "\n".join(problems)
