"""Reconciliation planning, sans I/O: a device that matches needs nothing; each kind of
drift is named once, with what will be done."""

from __future__ import annotations

from typing import Any

from actors.pds.wg_plan import DeviceState, Drift, PeerState, plan, repair_peers

A, B, C = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32


def desired() -> dict[str, dict[str, Any]]:
    return {"laptop-a": {"wg_public_key": A, "endpoint": "192.0.2.2:51820",
                         "allowed_ips": ["10.8.0.2/32"], "keepalive": 25},
            "cloud": {"wg_public_key": B, "endpoint": None,
                      "allowed_ips": ["10.8.0.3/32"], "keepalive": 0}}


def matching() -> DeviceState:
    return DeviceState(51820, True, {
        A: PeerState(A, "192.0.2.2:51820", ("10.8.0.2/32",), 25, 1.0, 5, 6),
        B: PeerState(B, "198.51.100.7:40000", ("10.8.0.3/32",), 0)})  # roamed: no endpoint set


def test_a_matching_device_is_left_alone() -> None:
    assert plan(51820, desired(), matching()) == []


def test_every_drift_is_named_with_its_repair() -> None:
    st = matching()
    drifted = DeviceState(40000, False, {
        A: PeerState(A, "192.0.2.99:1", ("10.8.0.0/24",), 0),
        C: PeerState(C, None, ("10.8.0.9/32",), 0)})
    assert plan(51820, desired(), drifted) == [
        Drift("private key", "none set", "set the node's key"),
        Drift("listen port", "40000", "set 51820"),
        Drift("peer cloud", "missing", "added"),  # peers in name order
        Drift("peer laptop-a allowed IPs", "10.8.0.0/24", "set 10.8.0.2/32"),
        Drift("peer laptop-a endpoint", "192.0.2.99:1", "set 192.0.2.2:51820"),
        Drift("peer laptop-a keepalive", "0", "set 25"),
        Drift(f"peer {C.hex()[:16]}...", "not in the ledger", "removed")]
    assert st.peers  # the matching device was not touched by planning
    assert {p.public_key for p in repair_peers(desired())} == {A, B}
