"""``ppn vm create|list|start|pause|resume|stop|destroy|balloon|pool``: the node's guests.

Every command goes through the running node's control socket: it enters at
pd-network-admin and reaches pd-vmm under pd-network-admin's ``vm.control`` (or, for ``list`` and
``pool``, ``vm.query``) capability, so a revoked capability makes it fail, naming it.
This module is what ``ppn vm`` loads (see :mod:`actors.entry`): json, a socket and
argparse, nothing of the node's runtime. pd-vmm checks everything before anything is
recorded or started: the name (1-32 of a-z, 0-9 and '-'), the profile, the sizes (the
profiles file's limits), and whether the operation fits the guest's state. On a stopped
node, ``list`` shows what the ledger last recorded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from actors import control_client as control
from actors.cli_run import run
from ledger.errors import LedgerError

TIMEOUT = 45.0  # the node's own bound (40 s) and some


def int_arg(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer from ``lo`` to ``hi``."""
    def convert(text: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or not (
                lo <= int(text) <= hi):
            raise argparse.ArgumentTypeError(f"{text[:20]!r}: not an integer {lo}-{hi}")
        return int(text)
    return convert


def _ask(args: argparse.Namespace, cmd: str, **fields: Any) -> Any:
    return control.request(args.state_dir, {"cmd": cmd, **fields}, timeout=TIMEOUT)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value}"


def _uptime(seconds: Any) -> str:
    if type(seconds) not in (int, float):
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def vm_line(vm: dict[str, Any]) -> str:
    return (f"vm {vm['name']} ({vm['profile']}): {vm['state']}, {vm['vcpus']} vCPUs, "
            f"{vm['ram_mib']} MiB" + (f", {vm['accel']}, pid {vm['pid']}"
                                      if vm.get("pid") else ""))


def _create(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"profile": args.profile, "start": args.start}
    for key, value in (("name", args.name), ("vcpus", args.vcpus), ("ram_mib", args.ram)):
        if value is not None:
            fields[key] = value
    print(vm_line(_ask(args, "vm.create", **fields)))
    return 0


def _one(args: argparse.Namespace) -> int:
    out = _ask(args, f"vm.{args.cmd}", name=args.name)
    if args.cmd == "destroy":
        print(f"vm {args.name} destroyed")
    else:
        print(vm_line(out))
    return 0


def _balloon(args: argparse.Namespace) -> int:
    vm = _ask(args, "vm.balloon", name=args.name, mib=args.mib)
    print(f"vm {vm['name']}: balloon target {vm['balloon_target_mib']} MiB, actual "
          f"{_mib(vm['balloon_actual_mib'])} MiB (the actual size moves only with a "
          "balloon driver in the guest)")
    return 0


LIST_HEAD = ("NAME", "PROFILE", "STATE", "VCPUS", "RAM", "BALLOON", "ACCEL", "PID",
             "UPTIME", "QMP")


def _list(args: argparse.Namespace) -> int:
    try:
        vms: list[dict[str, Any]] = _ask(args, "vm.list")
        where = None
    except control.NodeNotRunning:
        from pathlib import Path  # the ledger's reader: only when it is needed

        from actors.mesh_cli import _state
        from ledger.state import jsonable
        state = _state(Path(args.state_dir))
        vms = [jsonable({"name": v.name, "profile": v.profile, "state": v.state,
                         "vcpus": v.vcpus, "ram_mib": v.ram_mib, "accel": v.accel,
                         "pid": v.pid, "qmp": v.qmp, "image": v.image, "overlay": v.overlay,
                         "audit_qmp": None, "balloon_target_mib": v.balloon_mib,
                         "balloon_actual_mib": None, "uptime": None})
               for _, v in sorted(state.vms.items())]
        where = "the node is not running: as its ledger last recorded them"
    if args.json:
        print(json.dumps(vms, indent=2))
        return 0
    if where:
        print(f"({where})")
    rows = [LIST_HEAD] + [
        (v["name"], v["profile"], v["state"], str(v["vcpus"]), f"{v['ram_mib']}M",
         f"{_mib(v['balloon_target_mib'])}/{_mib(v['balloon_actual_mib'])}",
         v["accel"] or "-", str(v["pid"] or "-"), _uptime(v["uptime"]), v["qmp"] or "-")
        for v in vms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(LIST_HEAD) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if not vms:
        print("(no guests)")
    return 0


def _pool(args: argparse.Namespace) -> int:
    pool = _ask(args, "vm.pool")
    if args.json:
        print(json.dumps(pool, indent=2))
        return 0
    cpu, ram = pool["vcpus"], pool["ram_mib"]
    print(f"vCPUs: capacity {cpu['capacity']}, used {cpu['used']}, free {cpu['free']}")
    print(f"RAM: capacity {ram['capacity']} MiB (host {ram['host']} MiB less reserve "
          f"{ram['reserve']} MiB), used {ram['used']} MiB, free {ram['free']} MiB")
    guests = ", ".join(f"{n} {s}" for s, n in sorted(pool["guests"].items())) or "none"
    print(f"host: {pool['cpus']} CPUs, load {pool['load']}, accel {pool['accel']}, "
          f"supervision {pool['supervision']}; guests: {guests}")
    if pool.get("host_error"):
        print(f"warning: {pool['host_error']}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``ppn vm ...`` without the rest of ``ppn`` loaded (what :mod:`actors.entry` runs):
    the exit codes and one-line errors of :func:`actors.cli.main`."""
    top = argparse.ArgumentParser(prog="ppn")
    top.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    add_vm_commands(top.add_subparsers(dest="area", required=True))
    args = top.parse_args(argv)
    return run(args, (control.ControlError, LedgerError, OSError))


def add_vm_commands(top: Any) -> None:
    vm = top.add_parser("vm", help="the node's guest VMs (pd-vmm, QEMU)").add_subparsers(
        dest="cmd", required=True)
    create = vm.add_parser("create", help="define a guest from a profile (and start it)")
    create.add_argument("--state-dir", required=True)
    create.add_argument("--profile", required=True)
    create.add_argument("--name", default=None)
    create.add_argument("--vcpus", type=int_arg(1, 4096), default=None)
    create.add_argument("--ram", type=int_arg(1, 1 << 22), default=None, metavar="MIB")
    create.add_argument("--start", action="store_true")
    create.set_defaults(func=_create)
    ls = vm.add_parser("list", help="every guest: state, sizes, balloon, accel, pid, QMP")
    ls.add_argument("--state-dir", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    for op, text in (("start", "start a defined, stopped or lost guest"),
                     ("pause", "pause a running guest"), ("resume", "resume a paused guest"),
                     ("stop", "ACPI powerdown, then quit after 10 s"),
                     ("destroy", "stop it if it runs, remove its overlay and record")):
        p = vm.add_parser(op, help=text)
        p.add_argument("--state-dir", required=True)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=_one)
    balloon = vm.add_parser("balloon", help="set a running guest's balloon target")
    balloon.add_argument("--state-dir", required=True)
    balloon.add_argument("name", metavar="NAME")
    balloon.add_argument("mib", type=int_arg(1, 1 << 22), metavar="MIB")
    balloon.set_defaults(func=_balloon)
    pool = vm.add_parser("pool", help="capacity, used, free and reserve")
    pool.add_argument("--state-dir", required=True)
    pool.add_argument("--json", action="store_true")
    pool.set_defaults(func=_pool)
