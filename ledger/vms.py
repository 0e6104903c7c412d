"""Guest VMs as the ledger knows them: the record of each, and the lifecycle table.

A VM's life is a table, not code paths: each lifecycle event names an operation, and
:data:`TRANSITIONS` says from which states it may happen and where it leads.  The
fold applies only events that fit (an unfit one is refused at append, and counted as
inapplicable if an older writer left one); pd-vmm asks the same table before it does
anything, so an operation that does not fit the state (resume a running VM) is a clear
error, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
"""A VM's name: 1-32 of a-z, 0-9 and '-', starting with a letter or digit (``fullmatch``)."""

STATES = ("defined", "running", "paused", "stopped", "lost")
"""Where a VM can be.  A destroyed VM is no longer in the state (its name is free)."""

TRANSITIONS: dict[str, tuple[frozenset[str], str | None]] = {
    "start": (frozenset({"defined", "stopped", "lost"}), "running"),
    "pause": (frozenset({"running"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "stop": (frozenset({"running", "paused"}), "stopped"),
    "destroy": (frozenset({"defined", "running", "paused", "stopped", "lost"}), None),
    "lose": (frozenset({"running", "paused"}), "lost"),
    "reattach": (frozenset({"running", "paused"}), ""),  # "": the state stays
}
"""Operation -> (the states it may start from, the state it leads to; None: destroyed)."""

ACTIVE = frozenset({"running", "paused"})
"""States in which a VM holds its vCPUs and RAM (a QEMU process exists)."""

ACCELS = ("kvm", "tcg")
"""How a guest may be run, best first: one more row for NetBSD's ``nvmm``."""


def refused(op: str, name: str, state: str | None) -> str | None:
    """Why ``op`` does not fit VM ``name`` in ``state`` (None: it has no such VM); None
    if it fits."""
    if state is None:
        return f"no VM {name!r}"
    starts, _ = TRANSITIONS[op]
    if state not in starts:
        return (f"cannot {op} {name}: it is {state} (only from "
                f"{', '.join(s for s in STATES if s in starts)})")
    return None


@dataclass(frozen=True, slots=True)
class Vm:
    """One guest: how it was defined, and where it is now."""

    name: str
    profile: str
    vcpus: int
    ram_mib: int
    image: str | None
    overlay: str | None
    state: str
    accel: str | None = None
    pid: int | None = None
    qmp: str | None = None
    balloon_mib: int | None = None
    since_ns: int = 0  # when it entered its state (the record's timestamp)
    seq: int = -1  # the record that put it there
