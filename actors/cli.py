"""``ppn``: the node's command line (set-up, running it, its caps, ledger audits)."""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from actors import control
from actors.lifecycle import HostError
from actors.logs import configure_logging
from actors.runtime import LEDGER_SUBDIR, Node, cap_json
from actors.system import SystemDescriptionError, load_default
from ledger import audit
from ledger.catalog import REGISTRY, ROLES, MemberAdded, NodeIdentity
from ledger.errors import LedgerDataError, LedgerError, LedgerUsageError
from ledger.keys import NodeKeys
from ledger.log import Ledger
from ledger.scan import LedgerCorrupt
from ledger.state import jsonable

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MESH = ipaddress.ip_network("10.8.0.0/24")


def _node_init(args: argparse.Namespace) -> int:
    name: str = args.name
    if not NAME_RE.match(name):
        raise LedgerUsageError(f"node name {name!r}: use 1-63 of a-z, 0-9 and '-', "
                               "starting with a letter or digit")
    ip = ipaddress.ip_address(args.mesh_ip)
    if ip not in MESH or ip in (MESH.network_address, MESH.broadcast_address):
        raise LedgerUsageError(f"--mesh-ip {ip} is not a host address in {MESH}")
    state_dir = Path(args.state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger_dir = state_dir / LEDGER_SUBDIR
    if ledger_dir.exists():
        raise LedgerUsageError(f"{ledger_dir} exists: this state directory already has a node")
    system = load_default()
    keys = NodeKeys.generate()
    keys.save(state_dir)
    with Ledger.create(ledger_dir, keys, f"{name}.ppn/ledger") as ledger:
        ledger.append_many([
            NodeIdentity(name, keys.public_key, keys.wg_public_key, str(ip), args.role),
            MemberAdded(name, keys.public_key, keys.wg_public_key, str(ip), args.endpoint,
                        args.role),
            *system.initial_events(),
        ])
        vkey = audit.public_verifier_key(ledger_dir)
        print(f"node {name} initialised: {ledger.size} records")
    print(f"state directory: {state_dir}")
    print(f"ledger directory: {ledger_dir}")
    print(f"ledger signer: {vkey}")
    print(f"wireguard public key: {base64.b64encode(keys.wg_public_key).decode()}")
    return 0


def _progress_bar() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 40)
        sys.stderr.write(f"\rverifying [{bar:<40}] {frac:6.1%}")
        if done >= total:
            sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()
    return show


def _ledger_verify(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        print(f"ppn: --jobs must be at least 1, not {args.jobs}", file=sys.stderr)
        return 2
    pinned = None
    if args.key:
        from ledger.note import NoteVerifier
        pinned = NoteVerifier.from_string(args.key).public_key
    try:
        report = audit.verify(Path(args.dir), pinned_key=pinned, progress=_progress_bar(),
                              jobs=args.jobs)
    except LedgerCorrupt as exc:
        print(f"FAILED: {exc}")
        return 1
    print(report.summary())
    return 0


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _ledger_show(args: argparse.Namespace) -> int:
    out = sys.stdout
    for e in audit.entries(Path(args.dir)):
        if args.to is not None and e.seq > args.to:
            break
        et = REGISTRY.type_of(e.event)
        tag = et.tag
        if e.seq < args.from_ or (args.type and tag != args.type
                                  and not tag.startswith(args.type + ".")):
            continue
        fields = {k: jsonable(getattr(e.event, k)) for k in et.fields}
        if args.json:
            out.write(json.dumps({
                "seq": e.seq, "ts_ns": e.ts_ns, "time": _iso(e.ts_ns), "type": tag,
                "event": fields, "leaf_hash": e.leaf.hex(),
                "signature": e.signature.hex() if e.signature else None,
            }, separators=(",", ":")) + "\n")
        else:
            text = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
            mark = " [signed]" if e.signature else ""
            out.write(f"{e.seq:>7} {_iso(e.ts_ns)} {tag}{mark} {text}\n")
    return 0


def _ledger_state(args: argparse.Namespace) -> int:
    state = audit.state_at(Path(args.dir), args.at)
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    node = state.node or {}
    print(f"as of seq {state.seq}: node {node.get('name', '?')} ({node.get('role', '?')}, "
          f"{node.get('mesh_ip', '?')}), origin {state.origin}")
    print(f"protection domains: {', '.join(sorted(state.pds))}")
    print(f"members ({len(state.members)}):")
    for m in sorted(state.members.values(), key=lambda m: m.name):
        print(f"  {m.name:<20} {m.mesh_ip:<15} {m.role:<6} endpoint={m.endpoint}")
    print(f"capabilities ({len(state.caps)}):")
    for c in sorted(state.caps.values(), key=lambda c: c.cap_id):
        print("  " + _cap_row(cap_json(c)))
    return 0


def _ledger_checkpoint(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(audit.checkpoint_note(Path(args.dir), args.size))
    sys.stdout.flush()
    return 0


def _ledger_prove(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if args.consistency:
        proof = audit.prove_consistency(d, *args.consistency)
    elif args.seq is not None:
        proof = audit.prove_inclusion(d, args.seq, args.size)
    else:
        raise LedgerUsageError("give SEQ, or --consistency OLD NEW")
    print(json.dumps(proof, indent=2))
    return 0


def _read_bounded(path: str, limit: int = 1 << 20) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(limit + 1)[:limit + 1]
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LedgerDataError(f"{path}: larger than {limit} bytes")
    return data


def _ledger_check_proof(args: argparse.Namespace) -> int:
    try:
        proof = json.loads(_read_bounded(args.proof))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LedgerDataError(f"{args.proof}: not a JSON proof ({exc})") from None
    if not isinstance(proof, dict):
        raise LedgerDataError(f"{args.proof}: not a JSON proof object")
    old = _read_bounded(args.old_checkpoint) if args.old_checkpoint else None
    print(audit.check_proof(proof, _read_bounded(args.checkpoint), args.key, old))
    return 0


def _ledger_pubkey(args: argparse.Namespace) -> int:
    print(audit.public_verifier_key(Path(args.dir)))
    return 0


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
    node = Node(Path(args.state_dir))
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
        print(_cap_row(c))
    return 0


def _cap_row(c: dict[str, Any]) -> str:
    """One capability as a table row (``cap_json`` form)."""
    badge = "" if c["badge"] is None else f" badge={c['badge']}"
    parent = "" if c["parent"] is None else f" from #{c['parent']}"
    return (f"#{c['cap']:<4} {c['holder']:<18} {c['object']:<22} {','.join(c['rights'])}"
            f"{badge}{parent}")


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
    top = p.add_subparsers(dest="area", required=True)

    node = top.add_parser("node", help="set up and run this node").add_subparsers(
        dest="cmd", required=True)
    init = node.add_parser("init", help="create the node's keys and ledger")
    init.add_argument("--state-dir", required=True)
    init.add_argument("--name", required=True)
    init.add_argument("--mesh-ip", default="10.8.0.1")
    init.add_argument("--role", choices=ROLES, default="node")
    init.add_argument("--endpoint", default=None, help="underlay HOST:PORT peers dial")
    init.set_defaults(func=_node_init)
    _add_node_commands(node)
    _add_caps_commands(top)

    led = top.add_parser("ledger", help="audit a ledger directory").add_subparsers(
        dest="cmd", required=True)
    v = led.add_parser("verify", help="check the whole log, signatures, checkpoints")
    v.add_argument("dir")
    v.add_argument("--key", help="pin the signer (C2SP verifier key, as `pubkey` prints)")
    v.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes to check a large log with: 1 or 2 (default: 2 on 2+ CPUs)")
    v.set_defaults(func=_ledger_verify)
    s = led.add_parser("show", help="one record per line")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--from", dest="from_", type=int, default=0)
    s.add_argument("--to", type=int, default=None)
    s.add_argument("--type", default=None, help="event type, or a prefix such as 'cap'")
    s.set_defaults(func=_ledger_show)
    st = led.add_parser("state", help="the state rebuilt from the log")
    st.add_argument("dir")
    st.add_argument("--at", type=int, default=None, metavar="SEQ")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_ledger_state)
    c = led.add_parser("checkpoint", help="the newest signed checkpoint note, as stored")
    c.add_argument("dir")
    c.add_argument("--size", type=int, default=None, help="the checkpoint for this tree size")
    c.set_defaults(func=_ledger_checkpoint)
    pr = led.add_parser("prove", help="inclusion or consistency proof, as JSON")
    pr.add_argument("dir")
    pr.add_argument("seq", type=int, nargs="?")
    pr.add_argument("--size", type=int, default=None)
    pr.add_argument("--consistency", type=int, nargs=2, metavar=("OLD", "NEW"))
    pr.set_defaults(func=_ledger_prove)
    cp = led.add_parser("check-proof", help="verify a proof against signed checkpoints")
    cp.add_argument("proof", help="proof JSON file, or - for stdin")
    cp.add_argument("--checkpoint", required=True, help="checkpoint note file (tree size N)")
    cp.add_argument("--old-checkpoint", help="older checkpoint, for a consistency proof")
    cp.add_argument("--key", required=True, help="C2SP verifier key of the signer")
    cp.set_defaults(func=_ledger_check_proof)
    pk = led.add_parser("pubkey", help="the C2SP verifier key of the ledger's signer")
    pk.add_argument("dir")
    pk.set_defaults(func=_ledger_pubkey)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LedgerError, SystemDescriptionError, control.ControlError, HostError, ValueError,
            OSError) as exc:
        print(f"ppn: error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
