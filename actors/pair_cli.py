"""``ppn pair`` (on the new node) and ``ppn pair approve`` (on a member): the Genesis ceremony.

``ppn pair --state-dir DIR --listen IP:PORT [--length N] [--window S]`` asks the running
node (waiting to be joined) to open a ceremony, prints the code on the console, grouped
for reading, and follows the ceremony until it ends: exit 0 only if it completed, 1
with the reason otherwise.  ``ppn pair approve --state-dir DIR --code CODE --peer
IP:PORT`` runs the approving side.  ``--code -`` reads the code from standard input (a
code on the command line is in the process listing while the command runs; it is
single-use and short-lived, but ``-`` keeps it out).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from actors import control_client as control

POLL = 0.1
ASK_TIMEOUT = 75.0


def _ask(state_dir: str, cmd: str, **fields: Any) -> Any:
    return control.request(state_dir, {"cmd": cmd, **fields}, timeout=ASK_TIMEOUT)


def _start(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"listen": args.listen}
    if args.length is not None:
        fields["length"] = args.length
    if args.window is not None:
        fields["window"] = args.window
    opened = _ask(args.state_dir, "pair.start", **fields)
    number = opened["ceremony"]
    print(f"pairing code: {opened['code']}", flush=True)
    print(f"(ceremony {number}, listening on {opened['listen']}, valid for "
          f"{opened['window']} s: on a member, run ppn pair approve --state-dir DIR "
          f"--code - --peer {opened['listen']})", flush=True)
    deadline = time.monotonic() + opened["window"] + 30
    while time.monotonic() < deadline:
        st = _ask(args.state_dir, "pair.status")
        last = st.get("last") or {}
        if st.get("open") is None and last.get("ceremony") == number:
            return _outcome(last)
        time.sleep(POLL)
    print("ppn: error: the node did not say how the ceremony ended", file=sys.stderr)
    return 1


def _outcome(last: dict[str, Any]) -> int:
    if last.get("outcome") == "completed":
        print(f"paired with {last.get('peer')}: this node is a member of the mesh now")
        return 0
    why = last.get("reason") or last.get("outcome") or "it ended"
    print(f"ppn: error: the ceremony ended without pairing: {why}", file=sys.stderr)
    return 1


def _approve(args: argparse.Namespace) -> int:
    code = args.code
    if code == "-":
        code = sys.stdin.readline(200).strip()
    else:
        print("ppn: note: a code on the command line is in the process listing while this "
              "runs; --code - reads it from stdin", file=sys.stderr)
    fields: dict[str, Any] = {"code": code, "peer": args.peer}
    if args.window is not None:
        fields["window"] = args.window
    done = _ask(args.state_dir, "pair.approve", **fields)
    print(f"paired: {done['peer']} is a member now, at {done['mesh_ip']} "
          f"(ceremony {done['ceremony']})")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.pair_cmd == "approve":
        return _approve(args)
    if args.state_dir is None or args.listen is None:
        raise control.ControlError("ppn pair needs --state-dir DIR and --listen IP:PORT "
                                   "(or: ppn pair approve ...)")
    return _start(args)


def _int(lo: int, hi: int) -> Any:
    def convert(text: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 6) or not (
                lo <= int(text) <= hi):
            raise argparse.ArgumentTypeError(f"{text[:20]!r}: not an integer {lo}-{hi}")
        return int(text)
    return convert


def add_pair_commands(top: Any) -> None:
    pair = top.add_parser("pair", help="the Genesis ceremony: join this node to a mesh "
                                       "(or, with approve, admit one)")
    pair.add_argument("--state-dir", default=None)
    pair.add_argument("--listen", default=None, metavar="IP:PORT")
    pair.add_argument("--length", type=_int(6, 10), default=None, metavar="N")
    pair.add_argument("--window", type=_int(1, 86_400), default=None, metavar="S")
    pair.set_defaults(func=_dispatch, pair_cmd=None)
    sub = pair.add_subparsers(dest="pair_cmd")
    approve = sub.add_parser("approve", help="approve a new node: the code it shows")
    approve.add_argument("--state-dir", required=True)
    approve.add_argument("--code", required=True, help="the code, or - to read it from stdin")
    approve.add_argument("--peer", required=True, metavar="IP:PORT")
    approve.add_argument("--window", type=_int(1, 86_400), default=None, metavar="S")
