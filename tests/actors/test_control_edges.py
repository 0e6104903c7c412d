"""The control socket at its edges (issue 8, part 1): a request has a deadline from its
first byte, and a command the node never read is never reported as done."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import control

ROOT = Path(__file__).resolve().parents[2]


class StatusOnly:
    """The operator surface, answering status only (the socket and its threads are real)."""

    def status(self) -> dict[str, Any]:
        return {"node": "edge"}

    def caps_list(self, pd: str | None = None) -> list[dict[str, Any]]:
        return []

    def caps_tree(self) -> list[dict[str, Any]]:
        return []

    def revoke(self, cap_id: int) -> int:
        return 0

    def mint(self, cap_id: int, rights: list[str], to: str, badge: int | None = None
             ) -> dict[str, Any]:
        return {}

    def ping(self, pd: str | None = None, cap_id: int | None = None) -> Any:
        return None


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ppn-ctl-") as d:  # short: UNIX socket paths
        yield Path(d)


def test_trickling_clients_cannot_hold_every_slot(state_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_DEADLINE", 1.0)
    server = control.ControlServer(state_dir / control.SOCKET_NAME, StatusOnly())
    server.start()
    stop = threading.Event()
    socks = []
    try:
        for _ in range(control.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.fspath(state_dir / control.SOCKET_NAME))
            socks.append(s)

        def trickle() -> None:
            while not stop.wait(0.3):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b" ")
        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(3.5)  # past every trickled request's deadline (1 s) and its drain (1 s)
        assert control.request(state_dir, {"cmd": "status"}, timeout=5) == {"node": "edge"}
        assert server.bad_requests >= control.MAX_CLIENTS  # each told why it was dropped
    finally:
        stop.set()
        for s in socks:
            s.close()
        server.stop()


def test_a_request_the_node_never_read_is_an_error(state_dir: Path) -> None:
    """The node closes the connection without reading: the client must not say it worked."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(state_dir / control.SOCKET_NAME))
    listener.listen(4)

    def slam() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.close()
    threading.Thread(target=slam, daemon=True).start()
    try:
        with pytest.raises(control.ControlError, match=r"did not happen|without a complete"):
            control.request(state_dir, {"cmd": "caps.revoke", "cap": 3,
                                        "pad": "x" * (4 << 20)}, timeout=5)
        proc = subprocess.run([sys.executable, "-m", "actors.cli", "caps", "revoke",
                               "--state-dir", state_dir, "3"], cwd=ROOT,
                              capture_output=True, timeout=30)
        assert proc.returncode == 1 and proc.stdout == b""
        assert b"ppn: error:" in proc.stderr and b"Traceback" not in proc.stderr
    finally:
        listener.close()
