"""The mesh of issue 9 in the deterministic host: three simulated nodes (laptop-b the
hub, laptop-a, cloud), each with a simulated WireGuard device that its own
pd-net-driver starts and its own pd-wireguard sets from its ledger.  The spokes reach
each other through the hub; datagrams pass only between devices that have each other
configured under the right keys; a partition stops traffic and healing restores it;
drift (a killed device, a peer removed out of band) is repaired as on a real node; the
same seed gives byte-identical ledgers."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from ledger import audit
from sims.mesh import Mesh, build_mesh
from sims.node import scratch_directory

NAMES = ["laptop-b", "laptop-a", "cloud"]  # the first is the hub
IP = {"laptop-b": "10.8.0.1", "laptop-a": "10.8.0.2", "cloud": "10.8.0.3"}


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_directory("ppn-simwg-") as d, structlog.testing.capture_logs():
        yield d


@pytest.fixture
def mesh(workdir: Path) -> Iterator[Mesh]:
    m = build_mesh(workdir / "m", 21, NAMES)
    try:
        m.world.run_for(3)
        yield m
    finally:
        m.close()


def keys(mesh: Mesh, name: str) -> set[bytes]:
    return set(mesh.device(name).get().peers)


def ledger_peers(mesh: Mesh, name: str) -> set[bytes]:
    return {p.wg_public_key for p in mesh.nodes[name].ledger.state.peers.values()}


def repairs(mesh: Mesh, name: str) -> list[Any]:
    return [e.event for e in audit.entries(mesh.nodes[name].directory)
            if type(e.event).__name__ == "WgRepaired"]


def test_spokes_reach_each_other_through_the_hub(mesh: Mesh) -> None:
    wg = {n: mesh.nodes[n].keys.wg_public_key for n in NAMES}
    for name in NAMES:  # each device holds exactly its ledger's peers
        assert keys(mesh, name) == ledger_peers(mesh, name)
    assert keys(mesh, "laptop-b") == {wg["laptop-a"], wg["cloud"]}
    assert keys(mesh, "laptop-a") == {wg["laptop-b"]}
    for name in ("laptop-a", "cloud"):  # a handshake on every tunnel
        (hub,) = mesh.device(name).get().peers.values()
        assert hub.last_handshake > 0 and hub.rx_bytes > 0 and hub.tx_bytes > 0
    got = mesh.ping("laptop-a", IP["cloud"])
    assert got is not None and got[1] == 2  # forwarded by the hub, there and back
    assert mesh.device("laptop-b").stats["forwarded"] >= 2  # the echo and its reply
    hub = mesh.ping("cloud", IP["laptop-b"])
    assert hub is not None and hub[1] == 0
    assert mesh.ping("laptop-a", "10.8.0.9") is None  # nobody there
    # What the operator sees is what the device holds.
    answers: list[Any] = []
    node = mesh.nodes["laptop-a"]
    entry = next(c.cap_id for c in node.kernel.state.caps.values()
                 if c.obj == "endpoint:pd-network-admin" and c.parent is None)
    node.kernel.operator().call(entry, {"op": "mesh.status"}, answers.append)
    mesh.world.run_for(0.1)
    (st,) = answers
    assert st["up"] is True and st["address"] == "10.8.0.2/24"
    assert st["observed"][wg["laptop-b"].hex()]["last_handshake"] > 0


def test_only_devices_configured_for_each_other_with_the_right_keys_talk(
        mesh: Mesh) -> None:
    hub = mesh.device("laptop-b")
    cloud_key = mesh.nodes["cloud"].keys.wg_public_key
    # The hub holds a wrong key for cloud (set out of band): no handshake completes,
    # and cloud's traffic is dropped at the hub; the next reconciliation repairs it.
    entry = hub.peers.pop(cloud_key)
    wrong = os.urandom(32)
    hub.peers[wrong] = entry
    cloud = mesh.device("cloud")
    (peer,) = cloud.peers.values()
    peer.session_at = None  # its session lapsed: it must shake hands again
    before = hub.stats["unknown key"]
    assert mesh.ping("cloud", IP["laptop-b"], timeout=6) is None  # a retry in 5 s, too
    assert hub.stats["unknown key"] > before
    mesh.world.run_for(10)  # pd-wireguard's reconciliation, every 10 s
    what = {r.what for r in repairs(mesh, "laptop-b")}
    assert "peer cloud" in what and any(w.startswith("peer ") and w.endswith("...")
                                        for w in what)
    assert wrong not in hub.peers and cloud_key in hub.peers
    assert mesh.ping("cloud", IP["laptop-b"], timeout=6) is not None
    # A spoke cannot speak for another: an inner source outside its allowed IPs is dropped.
    a = mesh.device("laptop-a")
    dropped = hub.stats["source not allowed"]
    a.send_inner({"src": IP["cloud"], "dst": IP["laptop-b"], "ttl": 64, "kind": "echo",
                  "id": 999})
    mesh.world.run_for(0.1)
    assert hub.stats["source not allowed"] == dropped + 1
    # Garbage at a device's endpoint is dropped, and changes nothing.
    mesh.underlay.send("192.0.2.9:1", hub.endpoint, b"\x00garbage")
    mesh.world.run_for(0.1)
    assert hub.stats["garbage"] == 1 and keys(mesh, "laptop-b") == ledger_peers(mesh,
                                                                                 "laptop-b")


def test_a_partition_stops_traffic_and_healing_restores_it(mesh: Mesh) -> None:
    assert mesh.ping("laptop-a", IP["cloud"]) is not None
    mesh.underlay.partition({"192.0.2.2"}, {"192.0.2.1"})  # laptop-a | the hub
    assert mesh.ping("laptop-a", IP["cloud"]) is None
    assert mesh.ping("laptop-a", IP["laptop-b"]) is None
    assert mesh.ping("cloud", IP["laptop-b"]) is not None  # the other spoke is unaffected
    mesh.world.run_for(200)  # long enough for the session to lapse
    assert mesh.ping("laptop-a", IP["cloud"]) is None
    mesh.underlay.heal()
    # The next keepalive or retry shakes hands again, within seconds.
    got = mesh.ping("laptop-a", IP["cloud"], timeout=30)
    assert got is not None and got[1] == 2


def test_drift_is_repaired_as_on_a_real_node(mesh: Mesh) -> None:
    hub = mesh.device("laptop-b")
    before = len(repairs(mesh, "laptop-b"))
    # kill -9 of the hub's device: pd-net-driver starts it again, pd-wireguard sets it.
    hub.kill()
    assert mesh.ping("laptop-a", IP["cloud"], timeout=0.01) is None
    mesh.world.run_for(1)
    assert mesh.device("laptop-b").running and keys(mesh, "laptop-b") == ledger_peers(
        mesh, "laptop-b")
    assert mesh.ping("laptop-a", IP["cloud"], timeout=6) is not None
    status = mesh.nodes["laptop-b"].host.core_status("pd-net-driver") or {}
    assert status["tunnel_restarts"] == 1
    assert len(repairs(mesh, "laptop-b")) > before
    # The address flushed out of band comes back at the next reconciliation.
    hub.flush_address()
    assert mesh.ping("cloud", IP["laptop-b"], timeout=0.5) is None
    mesh.world.run_for(10)
    assert any(r.what == "link" for r in repairs(mesh, "laptop-b")[before:])
    assert mesh.ping("cloud", IP["laptop-b"]) is not None
    # A device that matches is left alone: no more events.
    settled = len(repairs(mesh, "laptop-b"))
    mesh.world.run_for(30)
    assert len(repairs(mesh, "laptop-b")) == settled


def scenario(directory: Path, seed: int) -> dict[str, Any]:
    m = build_mesh(directory, seed, NAMES)
    try:
        m.world.run_for(3)
        pings = [m.ping("laptop-a", IP["cloud"]), m.ping("cloud", IP["laptop-a"])]
        m.underlay.partition({"192.0.2.3"}, {"192.0.2.1"})
        pings.append(m.ping("cloud", IP["laptop-b"]))
        m.device("laptop-a").kill()
        m.world.run_for(20)
        m.underlay.heal()
        pings.append(m.ping("cloud", IP["laptop-a"], timeout=30))
        return {"pings": pings, "stats": dict(m.underlay.stats),
                "ledgers": {n: b"".join(p.read_bytes() for p in sorted(
                    (directory / n).glob("seg-*.log"))) for n in NAMES},
                "roots": [m.nodes[n].ledger.root() for n in NAMES]}
    finally:
        m.close()


def test_the_same_seed_gives_byte_identical_ledgers(workdir: Path) -> None:
    first, again = scenario(workdir / "1", 5), scenario(workdir / "2", 5)
    assert first["ledgers"]["laptop-b"] and first == again
    assert first["pings"][2] is None and first["pings"][3] is not None
    other = scenario(workdir / "3", 6)
    assert other["roots"] != first["roots"]
    assert base64.b64encode(first["roots"][0]) != base64.b64encode(other["roots"][0])
