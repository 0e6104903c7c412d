"""The mesh's desired WireGuard state (issue 9, first part): ``ppn node init`` grows
``--interface`` and ``--listen-port``, ``ppn node identity``, and ``ppn mesh peer
add|remove|list`` on a stopped node (straight into its ledger) and on a running one
(through pd-network-admin's ``peers`` capability to pd-wireguard)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import audit
from ledger.keys import NodeKeys
from ledger.log import Ledger

ROOT = Path(__file__).resolve().parents[2]


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def init(d: Path, name: str, role: str, ip: str, iface: str) -> Path:
    ppn("node", "init", "--state-dir", d, "--name", name, "--role", role, "--mesh-ip", ip,
        "--endpoint", f"192.0.2.{ip.rsplit('.', 1)[1]}:51820", "--interface", iface,
        "--listen-port", "51999")
    return d


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    return init(tmp_path / "hub", "laptop-b", "hub", "10.8.0.1", "ppn9hub")


@pytest.fixture
def spoke(tmp_path: Path) -> Path:
    return init(tmp_path / "spoke", "laptop-a", "node", "10.8.0.2", "ppn9a")


def identity(d: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(ppn("node", "identity", "--state-dir", d, "--json").stdout)
    return out


def test_identity_is_what_a_peer_needs(spoke: Path) -> None:
    ident = identity(spoke)
    keys = NodeKeys.load(spoke)
    assert ident == {"name": "laptop-a", "role": "node", "mesh_ip": "10.8.0.2",
                     "endpoint": "192.0.2.2:51820",
                     "wg_public_key": base64.b64encode(keys.wg_public_key).decode(),
                     "signing_key": base64.b64encode(keys.public_key).decode(),
                     "interface": "ppn9a", "listen_port": 51999}
    text = ppn("node", "identity", "--state-dir", spoke).stdout
    assert "wg_public_key: " + str(ident["wg_public_key"]) in text
    # The private key never shows, in the output or anywhere in the ledger.
    private_b64 = keys.wg_private_key_b64()
    private = base64.b64decode(private_b64)
    assert private_b64 not in text and private_b64 not in json.dumps(ident)
    for seg in (spoke / "ledger").glob("seg-*.log"):
        assert private not in seg.read_bytes()


def test_peers_follow_the_hub_rule_on_a_stopped_node(hub: Path, spoke: Path) -> None:
    a, b = identity(spoke), identity(hub)
    ppn("mesh", "peer", "add", "--state-dir", hub, "--name", "laptop-a", "--wg-key",
        a["wg_public_key"], "--endpoint", a["endpoint"], "--mesh-ip", "10.8.0.2",
        "--keepalive", "25")
    ppn("mesh", "peer", "add", "--state-dir", spoke, "--name", "laptop-b", "--wg-key",
        b["wg_public_key"], "--endpoint", b["endpoint"], "--mesh-ip", "10.8.0.1",
        "--role", "hub")
    on_hub = json.loads(ppn("mesh", "peer", "list", "--state-dir", hub, "--json").stdout)
    on_spoke = json.loads(ppn("mesh", "peer", "list", "--state-dir", spoke, "--json").stdout)
    assert [(p["name"], p["allowed_ips"], p["keepalive"]) for p in on_hub] == [
        ("laptop-a", ["10.8.0.2/32"], 25)]
    assert [(p["name"], p["allowed_ips"], p["role"]) for p in on_spoke] == [
        ("laptop-b", ["10.8.0.0/24"], "hub")]
    assert audit.verify(hub / "ledger").records == audit.verify(spoke / "ledger").records
    ppn("mesh", "peer", "remove", "--state-dir", hub, "laptop-a")
    assert json.loads(ppn("mesh", "peer", "list", "--state-dir", hub, "--json").stdout) == []
    with Ledger.open(hub / "ledger", NodeKeys.load(hub)) as led:  # replays to the same
        assert led.state.peers == {}


@pytest.mark.parametrize(("args", "needle"), [
    (["--wg-key", "AAAA", "--mesh-ip", "10.8.0.7"], "not a WireGuard key"),
    (["--wg-key", "!" * 44, "--mesh-ip", "10.8.0.7"], "not a WireGuard key"),
    (["--wg-key", "KEY", "--endpoint", "host:51820", "--mesh-ip", "10.8.0.7"], "IPv4:PORT"),
    (["--wg-key", "KEY", "--endpoint", "192.0.2.9", "--mesh-ip", "10.8.0.7"], "IPv4:PORT"),
    (["--wg-key", "KEY", "--mesh-ip", "10.9.0.7"], "not a host address in 10.8.0.0/24"),
    (["--wg-key", "KEY", "--mesh-ip", "10.8.0.255"], "not a host address"),
    (["--wg-key", "KEY", "--mesh-ip", "10.8.0.1"], "this node's own"),
    (["--wg-key", "OWN", "--mesh-ip", "10.8.0.7"], "this node's own"),
    (["--wg-key", "TAKEN", "--mesh-ip", "10.8.0.7"], "laptop-a's"),
    (["--wg-key", "KEY", "--mesh-ip", "10.8.0.2"], "laptop-a's"),
])
def test_bad_peers_are_refused_before_anything_is_recorded(
        hub: Path, spoke: Path, args: list[str], needle: str) -> None:
    a = identity(spoke)
    ppn("mesh", "peer", "add", "--state-dir", hub, "--name", "laptop-a", "--wg-key",
        a["wg_public_key"], "--mesh-ip", "10.8.0.2")
    size = audit.verify(hub / "ledger").records
    sub = {"KEY": key(), "OWN": str(identity(hub)["wg_public_key"]),
           "TAKEN": str(a["wg_public_key"])}
    bad = ppn("mesh", "peer", "add", "--state-dir", hub, "--name", "cloud",
              *[sub.get(x, x) for x in args], check=False)
    assert bad.returncode in (1, 2) and "Traceback" not in bad.stderr
    assert needle in bad.stderr, bad.stderr
    assert audit.verify(hub / "ledger").records == size
    again = ppn("mesh", "peer", "add", "--state-dir", hub, "--name", "laptop-a", "--wg-key",
                key(), "--mesh-ip", "10.8.0.9", check=False)
    assert again.returncode == 1 and "laptop-a is a peer already" in again.stderr


@pytest.fixture
def running(hub: Path, tmp_path: Path) -> Iterator[Path]:
    log = (tmp_path / "node.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "node", "run", "--state-dir",
                             str(hub), "--no-tunnel"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while ppn("node", "status", "--state-dir", hub, check=False).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "node did not start"
            time.sleep(0.05)
        yield hub
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.real
def test_on_a_running_node_peers_go_through_pd_network_admin(running: Path,
                                                              spoke: Path) -> None:
    a = identity(spoke)
    out = ppn("mesh", "peer", "add", "--state-dir", running, "--name", "laptop-a", "--wg-key",
              a["wg_public_key"], "--mesh-ip", "10.8.0.2", "--endpoint", a["endpoint"])
    assert "through the running node" in out.stdout
    dup = ppn("mesh", "peer", "add", "--state-dir", running, "--name", "laptop-a",
              "--wg-key", key(), "--mesh-ip", "10.8.0.3", check=False)
    assert dup.returncode == 1 and "pd-wireguard: laptop-a is a peer already" in dup.stderr
    assert [p["name"] for p in json.loads(ppn("mesh", "peer", "list", "--state-dir", running,
                                              "--json").stdout)] == ["laptop-a"]
    assert identity(running)["name"] == "laptop-b"  # identity works while the node runs
    caps = json.loads(ppn("caps", "list", "--state-dir", running, "--pd", "pd-network-admin",
                          "--json").stdout)
    peers_cap = next(c for c in caps if c["object"] == "peers")
    ppn("caps", "revoke", "--state-dir", running, str(peers_cap["parent"]))
    cut = ppn("mesh", "peer", "remove", "--state-dir", running, "laptop-a", check=False)
    assert cut.returncode == 1 and f"capability #{peers_cap['cap']} on peers" in cut.stderr
    assert [p["name"] for p in json.loads(ppn("mesh", "peer", "list", "--state-dir", running,
                                              "--json").stdout)] == ["laptop-a"]


def test_a_node_without_a_mesh_address_waits_to_be_joined(tmp_path: Path) -> None:
    d = tmp_path / "new"
    ppn("node", "init", "--state-dir", d, "--name", "laptop-c", "--endpoint",
        "192.0.2.9:51820", "--interface", "ppn9c")
    ident = identity(d)
    assert ident["mesh_ip"] is None and ident["endpoint"] == "192.0.2.9:51820"
    assert "mesh_ip: -" in ppn("node", "identity", "--state-dir", d).stdout
    keys = NodeKeys.load(d)
    with Ledger.open(d / "ledger", keys) as led:
        state = led.state_copy()
    assert state.members == {} and state.node is not None
    assert state.node["endpoint"] == "192.0.2.9:51820"
    # Its own membership (what the Genesis ceremony appends) must carry its own keys, and
    # an address no peer has; then the node has its address.
    from ledger.catalog import MemberAdded, WgPeerAdded
    from ledger.commands import EventInvalid, check_batch
    peer = WgPeerAdded("laptop-b", bytes(range(32)), "192.0.2.1:51820", "10.8.0.1", "hub",
                       ("10.8.0.0/24",), 0)
    check_batch(state, [peer])
    for bad, why in ((MemberAdded("laptop-c", keys.public_key, bytes(32), "10.8.0.9", None,
                                  "node"), "its own keys"),
                     (MemberAdded("laptop-c", keys.public_key, keys.wg_public_key, "10.8.0.1",
                                  None, "node"), "10.8.0.1 is laptop-b's")):
        with pytest.raises(EventInvalid, match=why):
            check_batch(state, [peer, bad])
    me = MemberAdded("laptop-c", keys.public_key, keys.wg_public_key, "10.8.0.9", None, "node")
    check_batch(state, [peer, me])
    with Ledger.open(d / "ledger", keys) as led:
        led.append_many([me])
    joined = identity(d)
    assert joined["mesh_ip"] == "10.8.0.9" and joined["endpoint"] == "192.0.2.9:51820"


def test_an_identity_written_before_endpoints_were_kept_in_it_reads_as_before() -> None:
    from ledger.catalog import REGISTRY, NodeIdentity
    from ledger.events import pack
    old = pack(["node.identity", 1, {"name": "old-node", "signing_key": bytes(32),
                                     "wg_public_key": bytes([1]) * 32, "mesh_ip": "10.8.0.4",
                                     "role": "node"}])
    got = REGISTRY.decode(old)
    assert got == NodeIdentity("old-node", bytes(32), bytes([1]) * 32, "10.8.0.4", "node", None)
