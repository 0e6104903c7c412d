"""One real node's tunnel (issue 9, first part): ``ppn node run`` inside a namespace this
test makes (prefix ``ppn9w``) starts wireguard-go through pd-net-driver, gives the
interface its address, and pd-wireguard sets the device from the ledger.  Drift is
repaired: kill -9 of wireguard-go (pushed, within seconds), a peer removed out of band
(`ppn mesh repair`); a killed and restarted node adopts the running device and finds
nothing to repair.  Everything is removed afterwards, even on failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.io import uapi
from ledger import audit
from ledger.catalog import MemberAdded
from ledger.keys import NodeKeys
from ledger.log import Ledger

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real
TAG = f"ppn9w{os.getpid() % 10000}"
NS, IFACE = TAG, TAG


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def in_ns(*args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", NS, *args], capture_output=True, text=True,
                          check=True).stdout


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (subprocess.CalledProcessError, AssertionError, KeyError):
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def dump() -> dict[str, list[str]]:
    """``wg show IFACE dump`` as {public key: fields}; the device's own line under ''."""
    lines = in_ns("wg", "show", IFACE, "dump").splitlines()
    return {"": lines[0].split("\t")} | {ln.split("\t")[0]: ln.split("\t") for ln in lines[1:]}


def repairs(state: Path) -> list[Any]:
    return [e.event for e in audit.entries(state / "ledger")
            if type(e.event).__name__ == "WgRepaired"]


class Run:
    def __init__(self, state: Path, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-m", "actors.cli", "node", "run",
             "--state-dir", str(state)], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log)
        wait_for(lambda: ppn("node", "status", "--state-dir", state, check=False
                             ).returncode == 0, 20)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)
        self._log.close()


def _cleanup() -> None:
    subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {IFACE}"], capture_output=True)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    uapi.socket_path(IFACE).unlink(missing_ok=True)


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """The namespace, and the node runs a test starts in it (all removed afterwards)."""
    if os.geteuid() != 0 or not shutil.which("wireguard-go") or not shutil.which("wg"):
        pytest.skip("needs root, wireguard-go and wireguard-tools")
    _cleanup()
    subprocess.run(["ip", "netns", "add", NS], check=True)
    subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
    started: list[Run] = []
    try:
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(10)
        _cleanup()


@pytest.fixture
def node(tmp_path: Path, runs: list[Run]) -> tuple[Path, list[Run]]:
    state = tmp_path / "hub"
    ppn("node", "init", "--state-dir", state, "--name", "laptop-b", "--role", "hub",
        "--mesh-ip", "10.8.0.1", "--endpoint", "192.0.2.1:51820", "--interface", IFACE,
        "--listen-port", "51831")
    return state, runs


def test_a_node_waiting_to_be_joined_brings_its_tunnel_up_once_it_has_an_address(
        runs: list[Run], tmp_path: Path) -> None:
    state = tmp_path / "new"
    ppn("node", "init", "--state-dir", state, "--name", "laptop-c", "--endpoint",
        "192.0.2.7:51820", "--interface", IFACE, "--listen-port", "51832")
    runs.append(Run(state, tmp_path / "run1.log"))
    st = json.loads(ppn("mesh", "status", "--state-dir", state, "--json").stdout)
    assert st["up"] is False and "waiting to be joined" in st["held_back"]
    assert "waiting to be joined" in ppn("mesh", "status", "--state-dir", state).stdout
    assert not uapi.socket_path(IFACE).exists()  # no wireguard-go started for it
    assert json.loads(ppn("node", "status", "--state-dir", state, "--json").stdout
                      )["mesh_ip"] is None
    runs[0].stop()
    # Its own membership, as the Genesis ceremony will append it: the tunnel comes up.
    keys = NodeKeys.load(state)
    with Ledger.open(state / "ledger", keys) as led:
        led.append_many([MemberAdded("laptop-c", keys.public_key, keys.wg_public_key,
                                     "10.8.0.7", None, "node")])
    runs.append(Run(state, tmp_path / "run2.log"))
    got = wait_for(lambda: dump()[""][2] == "51832" and dump())
    assert got[""][1] == base64.b64encode(keys.wg_public_key).decode()
    assert "10.8.0.7/24" in in_ns("ip", "-br", "addr", "show", IFACE)
    st = json.loads(ppn("mesh", "status", "--state-dir", state, "--json").stdout)
    assert st["up"] is True and st["held_back"] is None and st["address"] == "10.8.0.7/24"


def test_the_device_follows_the_ledger_and_drift_is_repaired(
        node: tuple[Path, list[Run]], tmp_path: Path) -> None:
    state, runs = node
    key = base64.b64encode(os.urandom(32)).decode()
    ppn("mesh", "peer", "add", "--state-dir", state, "--name", "laptop-a", "--wg-key", key,
        "--endpoint", "192.0.2.2:51820", "--mesh-ip", "10.8.0.2", "--keepalive", "25")
    runs.append(Run(state, tmp_path / "run1.log"))
    ident = json.loads(ppn("node", "identity", "--state-dir", state, "--json").stdout)
    got = wait_for(lambda: key in dump() and dump())
    assert got[""][1] == ident["wg_public_key"] and got[""][2] == "51831"
    assert got[key][2:5] == ["192.0.2.2:51820", "10.8.0.2/32", "0"] and got[key][7] == "25"
    assert set(got) == {"", key}  # exactly the ledger's peers
    assert "10.8.0.1/24" in in_ns("ip", "-br", "addr", "show", IFACE)
    assert in_ns("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"  # a hub forwards
    first = repairs(state)
    assert {r.what for r in first} >= {"private key", "peer laptop-a"}
    st = json.loads(ppn("mesh", "status", "--state-dir", state, "--json").stdout)
    assert (st["up"], st["address"], st["listen_port"], st["backend"]) == (
        True, "10.8.0.1/24", 51831, "wireguard-go")
    (peer,) = st["peers"]
    assert peer["desired"]["allowed_ips"] == peer["observed"]["allowed_ips"] == ["10.8.0.2/32"]
    assert peer["observed"]["endpoint"] == "192.0.2.2:51820"
    assert peer["observed"]["last_handshake"] == 0  # nobody answers at 192.0.2.2 here
    assert "laptop-a" in ppn("mesh", "status", "--state-dir", state).stdout

    # kill -9 of wireguard-go: pd-net-driver restarts it, pd-wireguard is told and sets it.
    subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {IFACE}"], check=True)
    t0 = time.monotonic()
    wait_for(lambda: key in dump() and dump()[""][2] == "51831", 10)
    assert time.monotonic() - t0 < 5
    assert len(repairs(state)) > len(first)

    # A peer removed out of band comes back on `ppn mesh repair`, one event for it.
    in_ns("wg", "set", IFACE, "peer", key, "remove")
    before = len(repairs(state))
    out = ppn("mesh", "repair", "--state-dir", state).stdout
    assert "repaired: peer laptop-a: missing -> added" in out
    assert key in dump() and len(repairs(state)) == before + 1
    # The link drifts too: its address removed (and its route with it) out of band.
    in_ns("ip", "addr", "flush", "dev", IFACE)
    out = ppn("mesh", "repair", "--state-dir", state).stdout
    assert "repaired: link: added 10.8.0.1/24" in out
    assert "10.8.0.1/24" in in_ns("ip", "-br", "addr", "show", IFACE)
    assert "10.8.0.0/24" in in_ns("ip", "route", "show", "dev", IFACE)
    before = len(repairs(state))
    in_ns("ip", "route", "del", "10.8.0.0/24", "dev", IFACE)
    assert "repaired: link: route 10.8.0.0/24 added" in ppn("mesh", "repair", "--state-dir",
                                                            state).stdout
    assert len(repairs(state)) == before + 1
    # A device that matches is left alone: no event, no reconfiguration.
    again = ppn("mesh", "repair", "--state-dir", state).stdout
    assert "nothing to repair" in again and len(repairs(state)) == before + 1

    # kill -9 of the node, and a restart: the running device is adopted, not torn down.
    pid_before = subprocess.run(["pgrep", "-f", f"wireguard-go -f {IFACE}"],
                                capture_output=True, text=True).stdout.split()
    runs[0].stop(signal.SIGKILL)
    runs.append(Run(state, tmp_path / "run2.log"))
    wait_for(lambda: "nothing to repair" in ppn("mesh", "repair", "--state-dir", state).stdout)
    pid_after = subprocess.run(["pgrep", "-f", f"wireguard-go -f {IFACE}"],
                               capture_output=True, text=True).stdout.split()
    assert pid_before and pid_after == pid_before
    assert len(repairs(state)) == before + 1

    # A peer added or removed on the running node reaches the device at once.
    other = base64.b64encode(os.urandom(32)).decode()
    ppn("mesh", "peer", "add", "--state-dir", state, "--name", "cloud", "--wg-key", other,
        "--mesh-ip", "10.8.0.3")
    wait_for(lambda: other in dump(), 3)
    ppn("mesh", "peer", "remove", "--state-dir", state, "laptop-a")
    wait_for(lambda: key not in dump(), 3)
    assert set(dump()) == {"", other}
