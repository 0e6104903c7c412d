"""``ppn ledger ...``: the auditor's commands over a ledger directory.

Each reads the whole log, checks its end the way ``verify`` does (the anchor, no
uncommitted tail) and exits 1 with one line naming what is wrong, after printing
what it could; ``recover`` is the one that writes, and only on an operator's word.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from actors.runtime import cap_json
from ledger import audit, proofcheck, recover
from ledger.catalog import REGISTRY
from ledger.errors import LedgerUsageError
from ledger.keys import NodeKeys
from ledger.note import MAX_NOTE_SIZE, NoteVerifier
from ledger.scan import LedgerCorrupt
from ledger.state import jsonable


def count(text: str) -> int:
    """A non-negative integer argument (a sequence number or a tree size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; sequence numbers and tree "
                                         "sizes start at 0")
    return value


def _progress_bar() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 40)
        sys.stderr.write(f"\rverifying [{bar:<40}] {frac:6.1%}")
        if done >= total:
            sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()
    return show


def _verify(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        print(f"ppn: --jobs must be at least 1, not {args.jobs}", file=sys.stderr)
        return 2
    pinned = NoteVerifier.from_string(args.key).public_key if args.key else None
    kept = [(name, proofcheck.read_input(name, MAX_NOTE_SIZE)) for name in args.against]
    try:
        report = audit.verify(Path(args.dir), pinned_key=pinned, progress=_progress_bar(),
                              jobs=args.jobs, against=kept)
    except LedgerCorrupt as exc:
        print(f"FAILED: {exc}")
        return 1
    print(report.summary())
    return 0


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _show(args: argparse.Namespace) -> int:
    out = sys.stdout
    for e in audit.entries(Path(args.dir)):  # to the end, even past --to: see LogPass
        et = REGISTRY.type_of(e.event)
        tag = et.tag
        if e.seq < args.from_ or (args.to is not None and e.seq > args.to) or (
                args.type and tag != args.type and not tag.startswith(args.type + ".")):
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


def _state(args: argparse.Namespace) -> int:
    state = audit.state_at(Path(args.dir), args.at)
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    node = state.node or {}
    print(f"as of seq {state.seq}: node {node.get('name', '?')} ({node.get('role', '?')}, "
          f"{node.get('mesh_ip') or 'no mesh address yet'}), origin {state.origin}")
    print(f"protection domains: {', '.join(sorted(state.pds))}")
    print(f"members ({len(state.members)}):")
    for m in sorted(state.members.values(), key=lambda m: m.name):
        print(f"  {m.name:<20} {m.mesh_ip:<15} {m.role:<6} endpoint={m.endpoint}")
    print(f"capabilities ({len(state.caps)}):")
    for c in sorted(state.caps.values(), key=lambda c: c.cap_id):
        print("  " + cap_row(cap_json(c)))
    return 0


def cap_row(c: dict[str, Any]) -> str:
    """One capability as a table row (``cap_json`` form)."""
    badge = "" if c["badge"] is None else f" badge={c['badge']}"
    parent = "" if c["parent"] is None else f" from #{c['parent']}"
    return (f"#{c['cap']:<4} {c['holder']:<18} {c['object']:<22} {','.join(c['rights'])}"
            f"{badge}{parent}")


def _checkpoint(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(audit.checkpoint_note(Path(args.dir), args.size))
    sys.stdout.flush()
    return 0


def _prove(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if args.consistency:
        proof = audit.prove_consistency(d, *args.consistency)
    elif args.seq is not None:
        proof = audit.prove_inclusion(d, args.seq, args.size)
    else:
        raise LedgerUsageError("give SEQ, or --consistency OLD NEW")
    print(json.dumps(proof, indent=2))
    return 0


def _check_proof(args: argparse.Namespace) -> int:
    source = "stdin" if args.proof == "-" else args.proof
    proof = proofcheck.parse_proof(proofcheck.read_input(args.proof), source)
    old = proofcheck.read_input(args.old_checkpoint) if args.old_checkpoint else None
    print(proofcheck.check_proof(proof, proofcheck.read_input(args.checkpoint), args.key, old))
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    print(audit.public_verifier_key(Path(args.dir)))
    return 0


def _recover(args: argparse.Namespace) -> int:
    if not args.drop_last_batch:
        raise LedgerUsageError("say what to recover: --drop-last-batch (the only choice)")
    d = Path(args.dir)
    keys = NodeKeys.load(Path(args.state_dir) if args.state_dir else d.resolve().parent)
    e = recover.drop_last_batch(d, keys)
    held = "an unreadable number of" if e.records < 0 else str(e.records)
    print(f"dropped the last batch: {held} records from seq {e.first_seq} ({e.dropped_bytes} "
          f"bytes at {e.segment} offset {e.offset}, sha256 {e.dropped_sha256.hex()}), kept "
          f"as {e.kept_as}; recorded as ledger.recovered at seq {e.first_seq}")
    if e.anchor_size > e.first_seq:
        print(f"note: the anchor had vouched for {e.anchor_size} records: the dropped batch "
              "had been acknowledged, and peers that kept a later checkpoint will see a fork")
    return 0


def add_ledger_commands(top: Any) -> None:
    led = top.add_parser("ledger", help="audit a ledger directory").add_subparsers(
        dest="cmd", required=True)
    v = led.add_parser("verify", help="check the whole log, signatures, checkpoints")
    v.add_argument("dir")
    v.add_argument("--key", help="pin the signer (C2SP verifier key, as `pubkey` prints)")
    v.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes to check a large log with: 1 or 2 (default: 2 on 2+ CPUs)")
    v.add_argument("--against", action="append", default=[], metavar="NOTE",
                   help="a checkpoint kept earlier (`ppn ledger checkpoint DIR > NOTE`): "
                   "the log must extend it (repeatable)")
    v.set_defaults(func=_verify)
    s = led.add_parser("show", help="one record per line")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--from", dest="from_", type=count, default=0, metavar="SEQ")
    s.add_argument("--to", type=count, default=None, metavar="SEQ")
    s.add_argument("--type", default=None, help="event type, or a prefix such as 'cap'")
    s.set_defaults(func=_show)
    st = led.add_parser("state", help="the state rebuilt from the log")
    st.add_argument("dir")
    st.add_argument("--at", type=count, default=None, metavar="SEQ")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_state)
    c = led.add_parser("checkpoint", help="the newest signed checkpoint note, as stored")
    c.add_argument("dir")
    c.add_argument("--size", type=count, default=None, help="the checkpoint for this tree size")
    c.set_defaults(func=_checkpoint)
    pr = led.add_parser("prove", help="inclusion or consistency proof, as JSON")
    pr.add_argument("dir")
    pr.add_argument("seq", type=count, nargs="?")
    pr.add_argument("--size", type=count, default=None)
    pr.add_argument("--consistency", type=count, nargs=2, metavar=("OLD", "NEW"))
    pr.set_defaults(func=_prove)
    cp = led.add_parser("check-proof", help="verify a proof against signed checkpoints")
    cp.add_argument("proof", help="proof JSON file, or - for stdin")
    cp.add_argument("--checkpoint", required=True, help="checkpoint note file (tree size N)")
    cp.add_argument("--old-checkpoint", help="older checkpoint, for a consistency proof")
    cp.add_argument("--key", required=True, help="C2SP verifier key of the signer")
    cp.set_defaults(func=_check_proof)
    pk = led.add_parser("pubkey", help="the C2SP verifier key of the ledger's signer")
    pk.add_argument("dir")
    pk.set_defaults(func=_pubkey)
    rc = led.add_parser("recover", help="an operator's repair of a ledger that will not open")
    rc.add_argument("dir")
    rc.add_argument("--drop-last-batch", action="store_true",
                    help="drop a damaged last batch whose checkpoint survived (recorded)")
    rc.add_argument("--state-dir", default=None,
                    help="where the node's keys are (default: the ledger's parent)")
    rc.set_defaults(func=_recover)
