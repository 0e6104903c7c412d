"""A backend that misbehaves (issue 9, bad input): a ``wireguard-go`` that exits at once,
and one whose UAPI socket answers nonsense.  Each is a clear error and one event
(``wg.tunnel_failed``), retried, and never a dead node.  Runs in a namespace this test
makes (prefix ``ppn9x``) with a fake ``wireguard-go`` first on the node's PATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.io import uapi
from ledger import audit

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real
TAG = f"ppn9x{os.getpid() % 10000}"

EXITS = "#!/bin/sh\necho 'fake: cannot open /dev/net/tun' >&2\nexit 3\n"
NONSENSE = f"""#!{sys.executable}
import os, socket, sys
path = "/var/run/wireguard/" + sys.argv[-1] + ".sock"
os.makedirs(os.path.dirname(path), exist_ok=True)
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)
while True:
    c, _ = s.accept(); c.recv(4096); c.sendall(b"\\x00 this is not uapi\\n\\n"); c.close()
"""


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def _cleanup() -> None:
    subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {TAG}"], capture_output=True)
    uapi.socket_path(TAG).unlink(missing_ok=True)
    subprocess.run(["ip", "netns", "del", TAG], capture_output=True)


@pytest.fixture(params=["exits", "nonsense"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2")
    _cleanup()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wireguard-go").write_text(EXITS if request.param == "exits" else NONSENSE)
    (fake / "wireguard-go").chmod(0o755)
    subprocess.run(["ip", "netns", "add", TAG], check=True)
    state = tmp_path / "n"
    ppn("node", "init", "--state-dir", state, "--name", "bad-wg", "--mesh-ip", "10.8.0.5",
        "--endpoint", "192.0.2.5:51820", "--interface", TAG)
    log = (tmp_path / "node.log").open("ab")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["ip", "netns", "exec", TAG, sys.executable, "-m", "actors.cli",
                             "node", "run", "--state-dir", str(state)], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield request.param, state
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        _cleanup()


def test_a_misbehaving_backend_is_an_event_and_an_error_never_a_dead_node(
        node: tuple[str, Path]) -> None:
    kind, state = node
    deadline = time.monotonic() + 30
    while True:
        failed = [e.event for e in audit.entries(state / "ledger")
                  if type(e.event).__name__ == "WgTunnelFailed"]
        if failed:
            break
        assert time.monotonic() < deadline, "no wg.tunnel_failed event"
        time.sleep(0.2)
    (event,) = failed[:1]
    if kind == "exits":
        assert "exited at once (3): fake: cannot open /dev/net/tun" in event.reason
    else:
        assert "not ready within" in event.reason and "not key=value" in event.reason
    st = json.loads(ppn("node", "status", "--state-dir", state, "--json").stdout)
    assert {p["status"] for p in st["pds"].values()} == {"running"}
    assert st["ledger"]["size"] > 0 and not any(p["restarts"] for p in st["pds"].values())
    mesh = json.loads(ppn("mesh", "status", "--state-dir", state, "--json").stdout)
    assert mesh["up"] is False and mesh["last_error"] and "\n" not in mesh["last_error"]
    repair = ppn("mesh", "repair", "--state-dir", state, check=False)
    assert repair.returncode == 1 and "the tunnel is not up" in repair.stderr
    assert "Traceback" not in repair.stderr
