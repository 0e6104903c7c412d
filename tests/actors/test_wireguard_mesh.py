"""The three-node mesh for real (issue 9): cloud, laptop-a and laptop-b (the hub), each a
node run in its own network namespace, joined by veths to a bridge on one underlay
segment (192.0.2.0/24) in a fourth namespace.  Peers are configured with ``ppn mesh peer
add`` from each other's ``ppn node identity``.  Through the tunnels, a ping from one
spoke to the other goes through the hub; ``wg show dump`` in each namespace lists
exactly the ledger's peers; a peer removed with ``ppn mesh peer remove`` stops carrying
traffic.  Namespaces (prefix ``ppn9m``), processes and sockets are removed afterwards,
even on failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.io import uapi

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real
TAG = f"ppn9m{os.getpid() % 1000}"
SWITCH = f"{TAG}sw"
NODES = {  # name: (role, mesh IP, underlay IP)
    "laptop-b": ("hub", "10.8.0.1", "192.0.2.1"),
    "laptop-a": ("node", "10.8.0.2", "192.0.2.2"),
    "cloud": ("cloud", "10.8.0.3", "192.0.2.3"),
}


def ns(name: str) -> str:
    return f"{TAG}{name[-1]}"  # b, a, d: short and unique


def iface(name: str) -> str:
    return f"{TAG}w{name[-1]}"  # the UAPI socket directory is shared: one name each


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def run(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def ping(name: str, ip: str, count: int = 1, timeout: int = 2) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns(name), "ping", "-c", str(count), "-W",
                           str(timeout), ip], capture_output=True).returncode == 0


def wait_for(cond: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def dump(name: str) -> set[str]:
    lines = run("ip", "netns", "exec", ns(name), "wg", "show", iface(name), "dump").splitlines()
    return {ln.split("\t")[0] for ln in lines[1:]}


def _cleanup() -> None:
    for name in NODES:
        subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {iface(name)}"],
                       capture_output=True)
        uapi.socket_path(iface(name)).unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", ns(name)], capture_output=True)
    subprocess.run(["ip", "netns", "del", SWITCH], capture_output=True)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, Path]]:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("wireguard-go", "wg", "ping")):
        pytest.skip("needs root, wireguard-go, wireguard-tools and ping")
    _cleanup()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        run("ip", "netns", "add", SWITCH)
        run("ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", SWITCH, "link", "set", "br0", "up")
        states: dict[str, Path] = {}
        for name, (role, mesh_ip, under) in NODES.items():
            n = ns(name)
            run("ip", "netns", "add", n)
            run("ip", "-n", n, "link", "set", "lo", "up")
            run("ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name",
                f"p{name[-1]}", "netns", SWITCH)
            run("ip", "-n", SWITCH, "link", "set", f"p{name[-1]}", "master", "br0", "up")
            run("ip", "-n", n, "addr", "add", f"{under}/24", "dev", "eth0")
            run("ip", "-n", n, "link", "set", "eth0", "up")
            state = tmp_path / name
            ppn("node", "init", "--state-dir", state, "--name", name, "--role", role,
                "--mesh-ip", mesh_ip, "--endpoint", f"{under}:51820", "--interface",
                iface(name), "--listen-port", "51820")
            states[name] = state
        ids = {name: json.loads(ppn("node", "identity", "--state-dir", s, "--json").stdout)
               for name, s in states.items()}
        for name, state in states.items():  # the hub peers with both; each spoke with the hub
            others = [o for o in NODES if o != name and "hub" in (NODES[name][0],
                                                                   NODES[o][0])]
            for o in others:
                ppn("mesh", "peer", "add", "--state-dir", state, "--name", o, "--wg-key",
                    ids[o]["wg_public_key"], "--endpoint", ids[o]["endpoint"], "--mesh-ip",
                    ids[o]["mesh_ip"], "--role", ids[o]["role"], "--keepalive", "5")
        for name, state in states.items():
            log = (tmp_path / f"{name}.log").open("ab")
            logs.append(log)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns(name), sys.executable, "-m", "actors.cli", "node",
                 "run", "--state-dir", str(state)], cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log))
        for state in states.values():
            wait_for(lambda s=state: ppn("node", "status", "--state-dir", s, check=False
                                         ).returncode == 0)
        yield states
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in logs:
            log.close()
        _cleanup()


def test_spokes_reach_each_other_through_the_hub(mesh: dict[str, Path]) -> None:
    ids = {n: json.loads(ppn("node", "identity", "--state-dir", s, "--json").stdout)
           for n, s in mesh.items()}
    # Each device lists exactly the ledger's peers.
    for name, state in mesh.items():
        want = {p["wg_public_key"] for p in json.loads(
            ppn("mesh", "peer", "list", "--state-dir", state, "--json").stdout)}
        wait_for(lambda n=name, w=want: dump(n) == w)
    assert dump("laptop-b") == {ids["laptop-a"]["wg_public_key"], ids["cloud"]["wg_public_key"]}
    # laptop-a -> cloud: the spokes have no tunnel to each other, only to the hub.
    assert wait_for(lambda: ping("laptop-a", "10.8.0.3"), 30)
    hops = run("ip", "netns", "exec", ns("laptop-a"), "ping", "-c", "1", "-W", "2", "-R",
               "10.8.0.3")
    assert "10.8.0.1" in hops  # the hub is on the recorded route
    st = json.loads(ppn("mesh", "status", "--state-dir", mesh["laptop-a"], "--json").stdout)
    (hub,) = st["peers"]
    assert hub["name"] == "laptop-b" and hub["desired"]["allowed_ips"] == ["10.8.0.0/24"]
    # A peer removed from the hub with `ppn mesh peer remove` stops carrying traffic.
    ppn("mesh", "peer", "remove", "--state-dir", mesh["laptop-b"], "cloud")
    wait_for(lambda: ids["cloud"]["wg_public_key"] not in dump("laptop-b"), 5)
    assert not ping("laptop-a", "10.8.0.3", timeout=1)
    assert ping("laptop-a", "10.8.0.1")  # the hub itself is still there
    base64.b64decode(ids["cloud"]["wg_public_key"])  # keys are base64, as wg shows them
