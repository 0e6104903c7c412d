"""The CLI at its edges: bad arguments, bugs, hostile proofs, an init to redo, recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors import cli
from ledger import audit
from ledger.catalog import REGISTRY, LedgerGenesis, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.records import FRAME_HEADER, KIND_RECORD, ZERO_HASH, Record, frame, segment_header
from ledger.scan import list_segments, segment_name

ROOT = Path(__file__).resolve().parents[2]


def ppn(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, input=stdin, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err and "Traceback" not in proc.stdout.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("edges") / "state"
    assert ppn("node", "init", "--state-dir", state, "--name", "edge-node").returncode == 0
    return state


@pytest.mark.parametrize("args", [
    ["state", "{d}", "--at", "-5"], ["show", "{d}", "--from", "-1"], ["show", "{d}", "--to", "-2"],
    ["checkpoint", "{d}", "--size", "-1"], ["prove", "{d}", "-3"],
    ["prove", "{d}", "--consistency", "1", "-1"], ["state", "{d}", "--at", "1e3"]])
def test_negative_and_malformed_numbers_are_refused(node: Path, args: list[str]) -> None:
    proc = ppn("ledger", *[a.format(d=node / "ledger") for a in args])
    assert proc.returncode == 2 and proc.stdout == b""
    assert "Traceback" not in proc.stderr.decode()
    assert b"negative" in proc.stderr or b"not a whole number" in proc.stderr


def test_state_at_the_last_record_and_past_it(node: Path) -> None:
    d = node / "ledger"
    size = audit.verify(d).records
    assert ppn("ledger", "state", d, "--at", str(size - 1)).returncode == 0
    past = ppn("ledger", "state", d, "--at", str(size))
    assert past.returncode == 1 and "has no record" in one_line_error(past)


def test_a_bug_is_one_line_and_exit_2(node: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: object) -> None:
        raise ZeroDivisionError("division by zero somewhere deep")
    monkeypatch.setattr(audit, "state_at", broken)
    assert cli.main(["ledger", "state", str(node / "ledger")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error in `ppn ledger state`: ZeroDivisionError" in err and "bug" in err
    assert cli.main(["--debug", "ledger", "state", str(node / "ledger")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "broken" in err


def test_memory_error_is_not_a_traceback(node: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def huge(*_: object) -> None:
        raise MemoryError
    monkeypatch.setattr(audit, "entries", huge)
    assert cli.main(["ledger", "show", str(node / "ledger")]) == 2
    assert "MemoryError" in capsys.readouterr().err


@pytest.mark.parametrize("proof", [
    b"[" * 100_000,
    b'{"kind": "inclusion", "origin": "x", "leaf_index": 1e400, "tree_size": 3, '
    b'"leaf_hash": "' + b"0" * 64 + b'", "proof": []}',
    b'{"kind": "inclusion", "origin": "x", "leaf_index": 0, "tree_size": 1e400, '
    b'"leaf_hash": "' + b"0" * 64 + b'", "proof": []}',
    b'{"kind": "consistency", "origin": "x", "old_size": NaN, "new_size": 3, "proof": []}',
])
def test_hostile_proofs_are_one_line_errors(node: Path, tmp_path: Path, proof: bytes) -> None:
    d = node / "ledger"
    note = tmp_path / "note"
    note.write_bytes(ppn("ledger", "checkpoint", d).stdout)
    key = ppn("ledger", "pubkey", d).stdout.decode().strip()
    (tmp_path / "p.json").write_bytes(proof)
    for source, stdin in ((tmp_path / "p.json", None), ("-", proof)):
        proc = ppn("ledger", "check-proof", source, "--checkpoint", note, "--key", key,
                   stdin=stdin)
        assert proc.returncode == 1
        assert one_line_error(proc).startswith("ppn: error:")


def test_kept_notes_that_are_not_files_are_refused(node: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = ppn("ledger", "verify", node / "ledger", "--against", fifo)
    assert proc.returncode == 1 and "FIFO" in one_line_error(proc)


# ------------------------------------------------------------ an init to redo

def _torn_init(state: Path) -> NodeKeys:
    """What a node init torn inside Ledger.create leaves: keys, and a first segment
    holding the genesis record without its checkpoint."""
    state.mkdir(parents=True)
    keys = NodeKeys.generate()
    keys.save(state)
    (state / "ledger").mkdir()
    body = Record(0, 1, ZERO_HASH, REGISTRY.encode(
        LedgerGenesis("torn.ppn/ledger", keys.public_key, 1)), None).body()
    (state / "ledger" / segment_name(0)).write_bytes(segment_header(0) + frame(KIND_RECORD,
                                                                               body))
    return keys


def test_every_command_calls_an_uncommitted_creation_not_initialised(tmp_path: Path) -> None:
    _torn_init(tmp_path / "s")
    d = tmp_path / "s" / "ledger"
    for args in (["verify", d], ["show", d], ["state", d], ["checkpoint", d], ["pubkey", d],
                 ["prove", d, "0"]):
        proc = ppn("ledger", *args)
        assert proc.returncode == 1
        text = proc.stdout.decode() + proc.stderr.decode()
        assert "not initialised" in text and "Traceback" not in text
    run = ppn("node", "run", "--state-dir", tmp_path / "s")
    assert run.returncode == 1 and "not initialised" in one_line_error(run)


def test_init_redoes_an_uncommitted_creation(tmp_path: Path) -> None:
    state = tmp_path / "s"
    keys = _torn_init(state)
    (state / "ledger.init").mkdir()  # and a staging directory an earlier init left
    proc = ppn("node", "init", "--state-dir", state, "--name", "redo-node", "--mesh-ip",
               "10.8.0.1")
    assert proc.returncode == 0, proc.stderr
    assert b"redone" in proc.stdout
    assert NodeKeys.load(state).public_key == keys.public_key  # never used: kept
    report = audit.verify(state / "ledger")
    assert report.records > 30 and report.members == 1
    assert not (state / "ledger.init").exists()
    again = ppn("node", "init", "--state-dir", state, "--name", "redo-node")
    assert again.returncode == 1 and "already has a node" in one_line_error(again)


def test_init_never_redoes_a_ledger_that_committed(node: Path) -> None:
    before = {p.name: p.read_bytes() for p in (node / "ledger").iterdir() if p.is_file()}
    proc = ppn("node", "init", "--state-dir", node, "--name", "other")
    assert proc.returncode == 1 and "already has a node" in one_line_error(proc)
    assert {p.name: p.read_bytes() for p in (node / "ledger").iterdir() if p.is_file()} == before


# ------------------------------------------------------------ recovery, through the CLI

def test_recover_through_the_cli(tmp_path: Path) -> None:
    state = tmp_path / "s"
    assert ppn("node", "init", "--state-dir", state, "--name", "rec-node").returncode == 0
    d = state / "ledger"
    keys = NodeKeys.load(state)
    with Ledger.open(d, keys, options=Options(set_append_only_flag=False)) as led:
        start = led.size
        led.append_many([PdDeclared(f"pd-{i}-" + "y" * 400, i) for i in range(40)])
    nothing = ppn("ledger", "recover", d, "--drop-last-batch")
    assert nothing.returncode == 1 and "nothing to recover" in one_line_error(nothing)
    path = list_segments(d)[-1][1]
    data = bytearray(path.read_bytes())
    off, n = 20, 0
    while n <= start + 20:  # to the middle of the last batch
        length = FRAME_HEADER.unpack_from(data, off)[0]
        n += data[off + 8] == KIND_RECORD
        off += 8 + length
    data[off:off + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    run = ppn("node", "run", "--state-dir", state)
    assert run.returncode == 1 and "--drop-last-batch" in one_line_error(run)
    assert ppn("ledger", "recover", d).returncode == 1  # the choice must be said
    proc = ppn("ledger", "recover", d, "--drop-last-batch")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert f"40 records from seq {start}" in out and "acknowledged" in out
    shown = ppn("ledger", "show", d, "--json", "--type", "ledger.recovered")
    [line] = shown.stdout.decode().splitlines()
    assert json.loads(line)["event"]["first_seq"] == start
    assert ppn("ledger", "verify", d).returncode == 0
