"""pd-net-driver's real adapter (netlink through pyroute2), reached the operator's way.

``ppn node run`` runs inside a network namespace this test makes (prefix ``ppn8nl``)
with a veth pair and a 192.0.2.0/24 address; ``ppn net links`` must show exactly
what the kernel has there, as ``ip -j`` reports it.  The command enters at
pd-network-admin and reaches pd-net-driver under pd-network-admin's ``net``
capability: once that is revoked, the command fails naming it.
"""

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

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real

NS = f"ppn8nl{os.getpid() % 100000}"


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    ip("netns", "add", NS)
    try:
        ip("-n", NS, "link", "add", "ppn8a", "type", "veth", "peer", "name", "ppn8b")
        ip("-n", NS, "addr", "add", "192.0.2.77/24", "dev", "ppn8a")
        ip("-n", NS, "link", "set", "ppn8a", "mtu", "1400")
        ip("-n", NS, "link", "set", "lo", "up")
        ip("-n", NS, "link", "set", "ppn8a", "up")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture
def running(tmp_path: Path, netns: str) -> Iterator[Path]:
    state = tmp_path / "state"
    ppn("node", "init", "--state-dir", state, "--name", "nl-node", "--endpoint",
        "192.0.2.77:51820")
    log = (tmp_path / "node.log").open("ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "actors.cli", "node", "run",
         "--state-dir", str(state), "--no-tunnel"], cwd=ROOT, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while ppn("node", "status", "--state-dir", state, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("node did not come up: "
                                     + (tmp_path / "node.log").read_text())
            time.sleep(0.05)
        yield state
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_net_links_shows_what_netlink_has_and_stops_once_the_cap_is_revoked(
        running: Path, netns: str) -> None:
    links = json.loads(ppn("net", "links", "--state-dir", running, "--json").stdout)
    expected = json.loads(ip("-j", "-n", netns, "addr", "show"))
    assert [(x["index"], x["name"], x["mtu"]) for x in links] == [
        (e["ifindex"], e["ifname"], e["mtu"]) for e in expected]
    by_name = {x["name"]: x for x in links}
    assert set(by_name) == {"lo", "ppn8a", "ppn8b"}
    assert by_name["ppn8a"]["mac"] == next(e["address"] for e in expected
                                           if e["ifname"] == "ppn8a")
    assert {(a["family"], a["address"], a["prefixlen"])
            for a in by_name["ppn8a"]["addresses"]} >= {("inet", "192.0.2.77", 24)}
    assert ("inet", "127.0.0.1", 8) in {(a["family"], a["address"], a["prefixlen"])
                                        for a in by_name["lo"]["addresses"]}
    text = ppn("net", "links", "--state-dir", running).stdout
    assert "ppn8a" in text and "192.0.2.77/24" in text and "mtu 1400" in text

    # pd-network-admin's cap on net (the one the command needs) goes with its parent's revoke.
    caps = json.loads(ppn("caps", "list", "--state-dir", running, "--pd", "pd-network-admin",
                          "--json").stdout)
    net_cap = next(c for c in caps if c["object"] == "net")
    ppn("caps", "revoke", "--state-dir", running, str(net_cap["parent"]))
    refused = ppn("net", "links", "--state-dir", running, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"capability #{net_cap['cap']} on net" in refused.stderr
    assert "pd-network-admin" in refused.stderr
    # The node is fine: other commands still answer.
    assert json.loads(ppn("node", "status", "--state-dir", running, "--json").stdout)[
        "pds"]["pd-net-driver"]["status"] == "running"
