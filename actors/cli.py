"""``ppn``: the node's command line (set-up, running it, its caps, ledger audits)."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from actors import control
from actors.cli_run import run
from actors.ledger_cli import add_ledger_commands, cap_row
from actors.lifecycle import HostError
from actors.logs import configure_logging
from actors.mesh_cli import (
    add_identity_command,
    add_mesh_commands,
    endpoint_arg,
    interface_arg,
    mesh_ip_arg,
    port_arg,
)
from actors.pair_cli import add_pair_commands
from actors.runtime import LEDGER_SUBDIR, Node
from actors.system import (
    DEFAULT_INTERFACE,
    DEFAULT_LISTEN_PORT,
    DEFAULT_PAIRINGS_PER_HOUR,
    DEFAULT_POOL,
    SystemDescriptionError,
    load_default,
)
from actors.vm_cli import add_vm_commands, int_arg
from ledger.catalog import ROLES, VmPool
from ledger.commands import NAME_RE
from ledger.errors import LedgerError, LedgerUsageError
from ledger.files import fsync_dir
from ledger.keys import NODE_KEY_FILE, WIREGUARD_KEY_FILE, NodeKeys
from ledger.log import Ledger
from ledger.note import verifier_key
from ledger.scan import LedgerCorrupt, LedgerNotInitialised, LogReader
from ledger.vms import ACCELS


def _node_init(args: argparse.Namespace) -> int:
    name: str = args.name
    if not NAME_RE.fullmatch(name):
        raise LedgerUsageError(f"node name {name!r}: use 1-63 of a-z, 0-9 and '-', "
                               "starting with a letter or digit")
    state_dir = Path(args.state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger_dir = state_dir / LEDGER_SUBDIR
    redo = _unfinished_init(ledger_dir)
    system = load_default()
    keys = _init_keys(state_dir, reuse=redo or not ledger_dir.exists())
    # Built beside its place and renamed into it, so `ledger/` only ever appears whole.
    staging = state_dir / (LEDGER_SUBDIR + ".init")
    if staging.exists():
        shutil.rmtree(staging)  # a torn earlier init: nothing in it was ever used
    origin = f"{name}.ppn/ledger"
    with Ledger.create(staging, keys, origin) as ledger:
        ledger.append_many(system.first_events(
            name, keys, args.mesh_ip, args.role, args.endpoint, args.interface,
            args.listen_port, VmPool(args.vm_vcpus, args.vm_reserve_mib, args.vm_accel),
            args.pairings_per_hour))
        size = ledger.size
    if redo:  # kept, not deleted: an auditor may want to see what the torn init left
        os.rename(ledger_dir, state_dir / f"{LEDGER_SUBDIR}.unfinished-{time.time_ns()}")
    os.rename(staging, ledger_dir)
    fsync_dir(state_dir)
    print(f"node {name} initialised: {size} records" + (" (an unfinished earlier init "
                                                        "was redone)" if redo else ""))
    print(f"state directory: {state_dir}")
    print(f"ledger directory: {ledger_dir}")
    print(f"ledger signer: {verifier_key(origin, keys.public_key)}")
    print(f"wireguard public key: {base64.b64encode(keys.wg_public_key).decode()}")
    return 0


_UNFINISHED_OK = re.compile(r"^(seg-0{20}\.log|\.lock|nodes\.jsonl|.*\.tmp)$")


def _unfinished_init(ledger_dir: Path) -> bool:
    """Whether ``ledger_dir`` holds a ledger whose creation never committed (and nothing
    else), which init may redo; False if there is none; refuses if it holds a node."""
    if not ledger_dir.exists():
        return False
    unfinished = ledger_dir.is_dir() and not ledger_dir.is_symlink() and all(
        _UNFINISHED_OK.match(p.name) for p in ledger_dir.iterdir())
    if unfinished:
        try:
            LogReader(ledger_dir, verify=False).run()
        except LedgerNotInitialised:
            return True
        except LedgerCorrupt as exc:
            unfinished = exc.reason.startswith("no segment files")
        else:
            unfinished = False  # a sound ledger: it committed, whatever files it lacks
    if not unfinished:
        raise LedgerUsageError(f"{ledger_dir} exists: this state directory already has a node")
    return True


def _init_keys(state_dir: Path, *, reuse: bool) -> NodeKeys:
    """The node's keys: new, or (``reuse``: redoing an init that never finished) the
    ones it left, which nothing has used yet."""
    present = [state_dir / f for f in (NODE_KEY_FILE, WIREGUARD_KEY_FILE)
               if (state_dir / f).exists()]
    if reuse and len(present) == 2:
        return NodeKeys.load(state_dir)
    if reuse:
        for path in present:  # half of a pair written by a torn init
            path.unlink()
    keys = NodeKeys.generate()
    keys.save(state_dir)
    return keys


class _StdlibToStructlog(logging.Handler):
    """Library logs (pykka's) as structlog lines, so a node's stderr is all JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, record.getMessage(),
                                              exc_info=record.exc_info)


def _node_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, handlers=[_StdlibToStructlog()], force=True)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    node = Node(Path(args.state_dir), tunnel=not args.no_tunnel)
    try:
        node.start()
        while not stop.wait(0.5):
            pass
        structlog.get_logger("node").info(
            "node.stopping", signal=signal.Signals(received[0]).name if received else None)
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _ask(args: argparse.Namespace, cmd: str, **fields: Any) -> Any:
    return control.request(Path(args.state_dir), {"cmd": cmd, **fields})


def _node_status(args: argparse.Namespace) -> int:
    st = _ask(args, "status")
    print(json.dumps(st, indent=2) if args.json else "\n".join(control.status_lines(st)))
    return 0


def _node_ping(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"pd": args.pd} if args.cap is None else {"cap": args.cap}
    print(json.dumps(_ask(args, "ping", **fields)))
    return 0


def _caps_list(args: argparse.Namespace) -> int:
    rows = _ask(args, "caps.list", **({} if args.pd is None else {"pd": args.pd}))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for c in rows:
        print(cap_row(c))
    return 0


def _caps_tree(args: argparse.Namespace) -> int:
    rows = _ask(args, "caps.tree")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(control.draw_tree(rows)))
    return 0


def _caps_revoke(args: argparse.Namespace) -> int:
    out = _ask(args, "caps.revoke", cap=args.cap)
    print(f"revoked #{out['cap']}: {out['revoked']} derived capabilities deleted")
    return 0


def _caps_mint(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"cap": args.cap, "rights": args.rights, "to": args.to}
    if args.badge is not None:
        fields["badge"] = args.badge
    out = _ask(args, "caps.mint", **fields)
    print(f"minted #{out['cap']} from #{out['parent']} for {args.to}")
    return 0


def _cap_id(text: str) -> int:
    try:
        value = int(text.removeprefix("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a capability id") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a capability id")
    return value


def _rights_list(text: str) -> list[str]:
    rights = [r.strip() for r in text.split(",") if r.strip()]
    if not rights:
        raise argparse.ArgumentTypeError("give rights as R[,R], e.g. read,write")
    return rights


def _add_node_commands(node: Any) -> None:
    run = node.add_parser("run", help="run the node in the foreground (SIGTERM stops it)")
    run.add_argument("--state-dir", required=True)
    run.add_argument("--no-tunnel", action="store_true",
                     help="leave WireGuard and the links alone (the control plane only)")
    run.set_defaults(func=_node_run)
    st = node.add_parser("status", help="the running node's PDs, ledger and counters")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_node_status)
    ping = node.add_parser("ping", help="call a PD through the kernel and print its answer")
    ping.add_argument("--state-dir", required=True)
    ping.add_argument("pd", nargs="?", default=None)
    ping.add_argument("--cap", type=_cap_id, default=None, help="call through this cap")
    ping.set_defaults(func=_node_ping)


def _net_links(args: argparse.Namespace) -> int:
    links = _ask(args, "net.links")
    if args.json:
        print(json.dumps(links, indent=2))
        return 0
    for link in links:
        addrs = ", ".join(f"{a['address']}/{a['prefixlen']}" for a in link["addresses"])
        print(f"{link['index']:>3} {link['name']:<16} {link['state']:<8} mtu {link['mtu']:<6} "
              f"{link['mac'] or '-':<17} {addrs or '-'}")
    return 0


def _add_net_commands(top: Any) -> None:
    net = top.add_parser("net", help="the running node's network, as pd-net-driver sees it"
                         ).add_subparsers(dest="cmd", required=True)
    links = net.add_parser("links", help="links and their addresses (netlink)")
    links.add_argument("--state-dir", required=True)
    links.add_argument("--json", action="store_true")
    links.set_defaults(func=_net_links)


def _add_caps_commands(top: Any) -> None:
    caps = top.add_parser("caps", help="the running node's capabilities").add_subparsers(
        dest="cmd", required=True)
    ls = caps.add_parser("list", help="capabilities, one per line")
    ls.add_argument("--state-dir", required=True)
    ls.add_argument("--pd", default=None)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_caps_list)
    tree = caps.add_parser("tree", help="the capability derivation tree")
    tree.add_argument("--state-dir", required=True)
    tree.add_argument("--json", action="store_true")
    tree.set_defaults(func=_caps_tree)
    rv = caps.add_parser("revoke", help="delete every capability derived from CAP-ID")
    rv.add_argument("--state-dir", required=True)
    rv.add_argument("cap", metavar="CAP-ID", type=_cap_id)
    rv.set_defaults(func=_caps_revoke)
    mint = caps.add_parser("mint", help="derive a capability from CAP-ID into a PD")
    mint.add_argument("--state-dir", required=True)
    mint.add_argument("cap", metavar="CAP-ID", type=_cap_id)
    mint.add_argument("--rights", required=True, type=_rights_list, metavar="R[,R]")
    mint.add_argument("--badge", type=int, default=None)
    mint.add_argument("--to", required=True, metavar="PD")
    mint.set_defaults(func=_caps_mint)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppn", description="PointSav Private Network node")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an internal error (a bug)")
    top = p.add_subparsers(dest="area", required=True)

    node = top.add_parser("node", help="set up and run this node").add_subparsers(
        dest="cmd", required=True)
    init = node.add_parser("init", help="create the node's keys and ledger")
    init.add_argument("--state-dir", required=True)
    init.add_argument("--name", required=True)
    init.add_argument("--mesh-ip", default=None, type=mesh_ip_arg,
                      help="its address on the mesh; without one the node waits to be "
                           "joined (the Genesis ceremony assigns it)")
    init.add_argument("--role", choices=ROLES, default="node")
    init.add_argument("--vm-vcpus", type=int_arg(1, 4096), default=DEFAULT_POOL.vcpus,
                      help="vCPUs the node hands out to guests (default %(default)s)")
    init.add_argument("--vm-reserve-mib", type=int_arg(0, 1 << 22),
                      default=DEFAULT_POOL.reserve_mib,
                      help="host RAM kept from guests, MiB (default %(default)s)")
    init.add_argument("--vm-accel", choices=("auto", *ACCELS), default=DEFAULT_POOL.accel,
                      help="how guests run: auto (KVM when /dev/kvm works, else TCG)")
    init.add_argument("--pairings-per-hour", type=int_arg(1, 60),
                      default=DEFAULT_PAIRINGS_PER_HOUR, metavar="N",
                      help="Genesis ceremonies that may begin in an hour (default 10)")
    init.add_argument("--endpoint", default=None, type=endpoint_arg,
                      help="underlay IP:PORT peers dial")
    init.add_argument("--interface", default=DEFAULT_INTERFACE, type=interface_arg,
                      help=f"the WireGuard interface (default {DEFAULT_INTERFACE})")
    init.add_argument("--listen-port", default=DEFAULT_LISTEN_PORT, type=port_arg,
                      help=f"WireGuard's UDP port (default {DEFAULT_LISTEN_PORT})")
    init.set_defaults(func=_node_init)
    _add_node_commands(node)
    add_identity_command(node)
    _add_caps_commands(top)
    _add_net_commands(top)
    add_mesh_commands(top)
    add_vm_commands(top)
    add_pair_commands(top)

    add_ledger_commands(top)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: exit 0 done, 1 refused (one line saying why), 2 a usage error
    or a bug (one line; ``--debug`` or PPN_DEBUG=1 adds the traceback)."""
    configure_logging()
    args = build_parser().parse_args(argv)
    return run(args, (LedgerError, SystemDescriptionError, control.ControlError, HostError,
                      OSError))


if __name__ == "__main__":
    sys.exit(main())
