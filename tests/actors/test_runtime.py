"""`ppn node run` as a real process, driven through its control socket and the CLI.

Init, run, mint and revoke, bad requests on the raw socket, ``kill -9``, restart
(the capability tree must come back identical and the ledger must verify), then
SIGTERM: exit 0 within seconds and the socket gone.  Everything on stderr is JSON.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


class RunningNode:
    def __init__(self, state: Path, log: Path) -> None:
        self.state, self.log = state, log
        self._err: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.cli", "node", "run", "--state-dir", str(state)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)
        deadline = time.monotonic() + 20
        while ppn("node", "status", "--state-dir", state, check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"node did not come up: {log.read_text()}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._err.close()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    s = tmp_path / "state"
    ppn("node", "init", "--state-dir", s, "--name", "laptop-b", "--role", "hub", "--mesh-ip",
        "10.8.0.1")
    yield s


def raw(path: Path, data: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return [json.loads(line) for line in sock.makefile("rb").read().splitlines()]


def drive(state: Path) -> None:
    """Mint, refuse an escalation, ping, revoke, and bad requests that change nothing."""
    assert ppn("caps", "mint", "--state-dir", state, "9", "--rights", "write,grant-reply",
               "--badge", "6", "--to", "pd-fleet").stdout.strip() == \
        "minted #33 from #9 for pd-fleet"
    assert ppn("caps", "mint", "--state-dir", state, "#33", "--rights", "write",
               "--to", "pd-fleet").stdout.startswith("minted #34 from #33")
    up = ppn("caps", "mint", "--state-dir", state, "34", "--rights", "write,grant",
             "--to", "pd-fleet", check=False)
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert "cap #34 (needs 'grant'): cannot derive 'grant'" in up.stderr
    pong = json.loads(ppn("node", "ping", "--state-dir", state, "--cap", "33").stdout)
    assert pong == {"op": "pong", "badge": 6, "from": "pd-vmm"}
    assert ppn("caps", "mint", "--state-dir", state, "21", "--rights", "read", "--to",
               "pd-vmm", check=False).returncode == 1  # #21 lacks grant
    assert ppn("caps", "mint", "--state-dir", state, "4", "--rights", "read", "--badge", "3",
               "--to", "pd-vmm").returncode == 0
    out = ppn("caps", "revoke", "--state-dir", state, "33").stdout
    assert out.strip() == "revoked #33: 1 derived capabilities deleted"
    replies = raw(state / "control.sock",
                  b'{"cmd": "caps.revoke", "cap": "26"}\n'
                  b'not json\n'
                  b'{"cmd": "status", "cmd": "status"}\n'
                  b'{"cmd": "caps.mint", "cap": 4, "rights": ["read"], "to": "pd-vmm", '
                  b'"badge": 3, "extra": 1}\n'
                  b'{"cmd": "format-disk"}\n'
                  b'\xff\xfe\n'
                  b'{"cmd": "caps.revoke", "cap": 2}\n')
    assert [r["ok"] for r in replies] == [False] * 6 + [True]
    assert "'cap' must be a capability id" in str(replies[0]["error"])
    assert "unknown field 'extra'" in str(replies[3]["error"])
    huge = raw(state / "control.sock", b'{"cmd": "status", "pad": "' + b"x" * 70_000 + b'"}\n')
    assert huge == [{"ok": False, "error": "request larger than 65536 bytes"}]


def test_node_run_survives_kill_and_stops_cleanly(state: Path, tmp_path: Path) -> None:
    sock = state / "control.sock"
    first = RunningNode(state, tmp_path / "run1.log")
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        drive(state)
        st = json.loads(ppn("node", "status", "--state-dir", state, "--json").stdout)
        assert st["node"] == "laptop-b" and st["role"] == "hub"
        assert {p["status"] for p in st["pds"].values()} == {"running"}
        assert st["refused_total"] >= 2 and st["ledger"]["size"] == 50
        tree = ppn("caps", "tree", "--state-dir", state).stdout
        assert "\u2514\u2500 #16 pd-wireguard endpoint:pd-net-driver write,grant-reply badge=3" \
            in tree
        assert "\u2514\u2500 #35 pd-vmm net read badge=3" in tree
        assert "#33" in tree and "#34" not in tree
        assert "#21 " not in tree and "#22 " not in tree  # revoking #2 took the journal caps
        os.kill(first.proc.pid, signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
    finally:
        first.close()
    assert sock.exists()  # stale: nothing listens
    down = ppn("node", "status", "--state-dir", state, check=False)
    assert down.returncode == 1 and "the node is not running" in down.stderr
    assert ppn("ledger", "verify", state / "ledger").stdout.startswith("ok: 50 records")

    second = RunningNode(state, tmp_path / "run2.log")
    try:
        assert ppn("caps", "tree", "--state-dir", state).stdout == tree
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(5) == 0
    finally:
        second.close()
    assert not sock.exists()
    assert ppn("ledger", "verify", state / "ledger").stdout.startswith("ok: 50 records")
    gone = ppn("caps", "list", "--state-dir", state, check=False)
    assert gone.returncode == 1 and "no control socket" in gone.stderr

    for log in (tmp_path / "run1.log", tmp_path / "run2.log"):
        lines = log.read_text().splitlines()
        assert lines
        events = [json.loads(line)["event"] for line in lines]
        assert "node.started" in events
    assert "node.stopped" in events and "control.stale_socket_removed" in events
