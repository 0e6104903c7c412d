"""``ppn node identity`` and ``ppn mesh peer add|remove|list``: the mesh's desired state.

On a running node, ``peer add`` and ``peer remove`` go through the control socket: they
enter at pd-network-admin and reach pd-wireguard under pd-network-admin's ``peers``
capability, so a revoked capability makes them fail, naming it.  On a stopped node
they append to its ledger directly (holding its lock), after the same command's
check.  Everything is checked before anything is recorded: the key (32 bytes of
base64), the endpoint (IP:PORT), the mesh address (in 10.8.0.0/24, not taken), the
name (not taken), the allowed IPs (no overlap), and that the key is not our own.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors import control
from actors.runtime import LEDGER_SUBDIR
from ledger import audit, commands
from ledger.catalog import ROLES, WgPeerAdded, WgPeerRemoved
from ledger.errors import LedgerUsageError
from ledger.keys import NodeKeys
from ledger.log import Ledger
from ledger.state import State, jsonable


def _state(state_dir: Path) -> State:
    """The ledger's state, read without its lock (the node may be running)."""
    ledger_dir = state_dir / LEDGER_SUBDIR
    if not ledger_dir.is_dir():
        raise LedgerUsageError(f"{ledger_dir}: no ledger; run `ppn node init` first")
    return audit.state_at(ledger_dir, None)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def identity(state: State) -> dict[str, Any]:
    node = state.node or {}
    return {"name": node.get("name"), "role": node.get("role"), "mesh_ip": node.get("mesh_ip"),
            "endpoint": node.get("endpoint"),
            "wg_public_key": _b64(node.get("wg_public_key", b"")),
            "signing_key": _b64(node.get("signing_key", b"")),
            "interface": (state.wg or {}).get("interface"),
            "listen_port": (state.wg or {}).get("listen_port")}


def _identity(args: argparse.Namespace) -> int:
    ident = identity(_state(Path(args.state_dir)))
    if args.json:
        print(json.dumps(ident, indent=2))
    else:
        for k, v in ident.items():
            print(f"{k}: {v if v is not None else '-'}")
    return 0


def wg_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a WireGuard key (32 bytes "
                                         "of base64)")
    return key


def argument(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a command's check: its EventInvalid is the usage error."""
    def convert(text: str) -> Any:
        try:
            return check(text)
        except commands.EventInvalid as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


mesh_ip_arg = argument(lambda t: str(commands.mesh_ip(t)))
endpoint_arg = argument(lambda t: "{}:{}".format(*commands.endpoint(t)))
interface_arg = argument(commands.interface)
port_arg = argument(lambda t: commands.port(int(t) if t.isascii() and t.isdigit() else -1))


def _offline(state_dir: Path, make: Any) -> dict[str, Any]:
    """Append one command's event to a stopped node's ledger, after the command's check."""
    with Ledger.open(state_dir / LEDGER_SUBDIR, NodeKeys.load(state_dir)) as ledger:
        event = make(ledger.state)
        try:
            commands.check(ledger.state, event)
        except commands.EventInvalid as exc:
            raise LedgerUsageError(str(exc)) from None
        ledger.append(event)
        return {"seq": ledger.size - 1}


def _peer_add(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    fields: dict[str, Any] = {"name": args.name, "wg_key": _b64(args.wg_key),
                              "mesh_ip": args.mesh_ip, "role": args.role,
                              "keepalive": args.keepalive}
    if args.endpoint is not None:
        fields["endpoint"] = args.endpoint
    try:
        peer = control.request(state_dir, {"cmd": "mesh.peer.add", **fields})
        where = "through the running node"
    except control.NodeNotRunning:
        def make(state: State) -> WgPeerAdded:
            own_role = (state.node or {}).get("role")
            return WgPeerAdded(args.name, args.wg_key, args.endpoint, args.mesh_ip, args.role,
                               commands.allowed_ips(own_role, args.role, args.mesh_ip),
                               args.keepalive)
        _offline(state_dir, make)
        peer = {"name": args.name, "mesh_ip": args.mesh_ip}
        where = "in the stopped node's ledger"
    print(f"peer {peer['name']} ({peer['mesh_ip']}) added {where}")
    return 0


def _peer_remove(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    try:
        control.request(state_dir, {"cmd": "mesh.peer.remove", "name": args.name})
        where = "through the running node"
    except control.NodeNotRunning:
        _offline(state_dir, lambda state: WgPeerRemoved(args.name, "removed by the operator"))
        where = "in the stopped node's ledger"
    print(f"peer {args.name} removed {where}")
    return 0


def _peer_list(args: argparse.Namespace) -> int:
    state = _state(Path(args.state_dir))
    peers = [jsonable({"name": p.name, "wg_public_key": p.wg_public_key,
                       "endpoint": p.endpoint, "mesh_ip": p.mesh_ip, "role": p.role,
                       "allowed_ips": list(p.allowed_ips), "keepalive": p.keepalive})
             for _, p in sorted(state.peers.items())]
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    for p in peers:
        print(f"{p['name']:<20} {p['mesh_ip']:<12} {p['role']:<6} {p['endpoint'] or '-':<22} "
              f"{','.join(p['allowed_ips'])} keepalive {p['keepalive'] or 'off'} "
              f"key {p['wg_public_key']}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    repaired = control.request(Path(args.state_dir), {"cmd": "mesh.repair"})
    for line in repaired:
        print(f"repaired: {line}")
    if not repaired:
        print("the device matches the ledger: nothing to repair")
    return 0


def _status(args: argparse.Namespace) -> int:
    st = control.request(Path(args.state_dir), {"cmd": "mesh.status"})
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    iface = st.get("interface") or {}
    print(f"interface {iface.get('interface', '-')} ({st['backend']}): "
          f"{'up' if st['up'] else 'down'}, address {st['address'] or '-'}, listen port "
          f"{st['listen_port'] or '-'} (desired {iface.get('listen_port', '-')}), repairs "
          f"{st['repairs']}" + (f", last error: {st['last_error']}" if st["last_error"] else "")
          + (f" ({st['held_back']})" if st.get("held_back") else ""))
    for p in st["peers"]:
        d, o = p["desired"], p["observed"]
        shake = o and o["last_handshake"]
        ago = f"{max(0.0, time.time() - shake):.0f} s ago" if shake else "never"
        seen = "not on the device" if o is None else (
            f"endpoint {o['endpoint'] or '-'}, allowed {','.join(o['allowed_ips'])}, "
            f"handshake {ago}, rx {o['rx_bytes']}, tx {o['tx_bytes']}")
        print(f"  {p['name']:<18} desired: endpoint {d['endpoint'] or '-'}, allowed "
              f"{','.join(d['allowed_ips'])} | observed: {seen}")
    return 0


def _member_remove(args: argparse.Namespace) -> int:
    control.request(Path(args.state_dir), {"cmd": "mesh.member.remove", "name": args.name})
    print(f"member {args.name} removed; every other member is told (signed, over the "
          "tunnel)")
    return 0


def _member_list(args: argparse.Namespace) -> int:
    out = control.request(Path(args.state_dir), {"cmd": "mesh.member.list"})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for m in out["members"]:
        print(f"{m['name']:<20} {m['mesh_ip']:<12} {m['role']:<6} "
              f"{m.get('endpoint') or '-':<22} approved by {m.get('approved_by') or '(founder)'}")
    heard = ", ".join(f"{k} {v}" for k, v in sorted(out["heard"].items())) or "none"
    print(f"announcements heard: {heard}; sent: {out['told'].get('sent', 0)}")
    return 0


def add_identity_command(node: Any) -> None:
    ident = node.add_parser("identity", help="what a peer needs to add this node")
    ident.add_argument("--state-dir", required=True)
    ident.add_argument("--json", action="store_true")
    ident.set_defaults(func=_identity)


def add_mesh_commands(top: Any) -> None:
    mesh = top.add_parser("mesh", help="the mesh's desired WireGuard state").add_subparsers(
        dest="area", required=True)
    peer = mesh.add_parser("peer", help="the WireGuard peers this node should have"
                           ).add_subparsers(dest="cmd", required=True)
    add = peer.add_parser("add", help="add a peer (checked before anything is recorded)")
    add.add_argument("--state-dir", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--wg-key", required=True, type=wg_key, metavar="KEY")
    add.add_argument("--endpoint", default=None, type=endpoint_arg, metavar="IP:PORT")
    add.add_argument("--mesh-ip", required=True, type=mesh_ip_arg, metavar="10.8.0.X")
    add.add_argument("--role", choices=ROLES, default="node")
    add.add_argument("--keepalive", type=int, default=0, metavar="S")
    add.set_defaults(func=_peer_add)
    rm = peer.add_parser("remove", help="remove a peer")
    rm.add_argument("--state-dir", required=True)
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_peer_remove)
    ls = peer.add_parser("list", help="the desired peers")
    ls.add_argument("--state-dir", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_peer_list)
    member = mesh.add_parser("member", help="the mesh's members (nodes.jsonl)"
                             ).add_subparsers(dest="cmd", required=True)
    mrm = member.add_parser("remove", help="remove a member; every other member is told")
    mrm.add_argument("--state-dir", required=True)
    mrm.add_argument("name", metavar="NAME")
    mrm.set_defaults(func=_member_remove)
    mls = member.add_parser("list", help="the members, and the announcements heard")
    mls.add_argument("--state-dir", required=True)
    mls.add_argument("--json", action="store_true")
    mls.set_defaults(func=_member_list)
    repair = mesh.add_parser("repair", help="reconcile the WireGuard device now")
    repair.add_argument("--state-dir", required=True)
    repair.set_defaults(func=_repair)
    status = mesh.add_parser("status", help="the interface, and per peer desired vs observed")
    status.add_argument("--state-dir", required=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
