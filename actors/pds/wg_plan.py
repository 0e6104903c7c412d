"""Reconciliation, sans I/O: what differs between the desired WireGuard state (the
ledger's) and the device as observed (UAPI ``get=1``), and what to set to repair it.

A device that already matches gives no repairs, so it is left alone: no event and
no reconfiguration.  Each difference is one :class:`Drift`, naming what drifted and
what will be done; the repair is a single ``set=1`` that states the whole peer set
(``replace_peers``), so the device ends exactly as desired whatever it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PeerConfig:
    """One peer as it should be set."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    keepalive: int = 0


@dataclass(frozen=True)
class PeerState:
    """One peer as the device reports it."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    last_handshake: float = 0.0  # seconds since the epoch; 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    listen_port: int
    public_key_set: bool  # whether the device has a private key (never the key itself)
    peers: dict[bytes, PeerState] = field(default_factory=dict)




@dataclass(frozen=True, slots=True)
class Drift:
    what: str  # e.g. "peer laptop-a missing", "listen port"
    found: str
    repair: str


def desired_peers(peers: dict[str, dict[str, Any]]) -> dict[bytes, tuple[str, PeerConfig]]:
    """The desired peers (the ``wg`` section's ``peers``) by public key."""
    return {p["wg_public_key"]: (name, PeerConfig(p["wg_public_key"], p["endpoint"],
                                                  tuple(sorted(p["allowed_ips"])),
                                                  p["keepalive"]))
            for name, p in sorted(peers.items())}


def plan(listen_port: int, peers: dict[str, dict[str, Any]],
         observed: DeviceState) -> list[Drift]:
    """Every difference between what should be and what the device reports."""
    drifts: list[Drift] = []
    if not observed.public_key_set:
        drifts.append(Drift("private key", "none set", "set the node's key"))
    if observed.listen_port != listen_port:
        drifts.append(Drift("listen port", str(observed.listen_port), f"set {listen_port}"))
    want = desired_peers(peers)
    for key, (name, cfg) in want.items():
        got = observed.peers.get(key)
        if got is None:
            drifts.append(Drift(f"peer {name}", "missing", "added"))
            continue
        if tuple(sorted(got.allowed_ips)) != cfg.allowed_ips:
            drifts.append(Drift(f"peer {name} allowed IPs", ",".join(got.allowed_ips) or "none",
                                f"set {','.join(cfg.allowed_ips)}"))
        if cfg.endpoint is not None and got.endpoint != cfg.endpoint:
            drifts.append(Drift(f"peer {name} endpoint", got.endpoint or "none",
                                f"set {cfg.endpoint}"))
        if got.keepalive != cfg.keepalive:
            drifts.append(Drift(f"peer {name} keepalive", str(got.keepalive),
                                f"set {cfg.keepalive}"))
    for key in sorted(set(observed.peers) - set(want)):
        drifts.append(Drift(f"peer {key.hex()[:16]}...", "not in the ledger", "removed"))
    return drifts


def repair_peers(peers: dict[str, dict[str, Any]]) -> list[PeerConfig]:
    """The whole peer set a repair states."""
    return [cfg for _, cfg in desired_peers(peers).values()]
