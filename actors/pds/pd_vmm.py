"""pd-vmm: the node's guest VMs, under QEMU, and the resource pool they draw on.

It serves ``vm.control`` and ``vm.query``; every operation needs one of them (the
object a message came in on says which).  A holder of ``vm.control`` may call:

* ``{"op": "vm.create", "profile", "name"?, "vcpus"?, "ram_mib"?, "start"?}``
* ``{"op": "vm.start" | "vm.pause" | "vm.resume" | "vm.stop" | "vm.destroy", "name"}``
* ``{"op": "vm.balloon", "name", "mib"}``

and a holder of either, ``{"op": "vm.list"}`` and ``{"op": "vm.pool"}``.

Each step of a guest's life is an event (family ``vm``), and the lifecycle is the table
in :mod:`ledger.vms`: an operation that does not fit the guest's state is an error
answer.  What QEMU says is the truth: a guest is recorded paused or resumed when QMP
says so (asked or not), stopped or destroyed when its process ends after being asked,
and lost when it ends unasked.  A stop is ACPI powerdown, then ``quit`` after
:data:`STOP_TIMEOUT` (a guest without an OS never powers itself off).

Admission: a start that would take more vCPUs than the pool's capacity, or more RAM
than the host's less its reserve, is refused with the numbers.  When its core starts
(the node started again), pd-vmm asks the adapter for each guest the ledger says runs:
one still running is re-attached (``vm.reattached``), one gone is ``vm.lost``; none is
started twice.

The core does no I/O: the adapter (``actors/io/qemu.py``; ``sims/backends/qemu.py`` in
the simulator) loads the profiles, reads the host, runs QEMU and speaks QMP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from actors.pds.base import (
    Action,
    Append,
    Core,
    IoAnswer,
    IoInput,
    IoRequest,
    IoResult,
    Message,
    PdView,
    Reply,
    ReplyCap,
    SetTimer,
)
from ledger.catalog import (
    VmBalloonSet,
    VmDefined,
    VmDestroyed,
    VmLost,
    VmPaused,
    VmReattached,
    VmResumed,
    VmStarted,
    VmStopped,
)
from ledger.vms import ACCELS, ACTIVE, NAME_RE, refused

STOP_TIMEOUT = 10.0  # seconds from ACPI powerdown to quit
MAX_GUESTS = 1024
"""Guests defined on one node (running ones are bounded by the pool): ``vm.list`` of all
of them stays well inside one kernel message (MAX_MESSAGE_BYTES)."""
MIB = 1 << 20


# ----------------------------------------------------------------------------- I/O
@dataclass(frozen=True, slots=True)
class LoadHost(IoRequest):
    """The profiles (shipped, or the node's own file), the host's RAM, CPUs, load and
    accelerators, and where guests' files go: ``{"profiles", "limits", "mem_mib",
    "cpus", "load", "accels", "vm_dir"}``."""


@dataclass(frozen=True, slots=True)
class MakeOverlay(IoRequest):
    """A qcow2 overlay at ``overlay`` backed by ``image`` (which is never written)."""

    image: str
    overlay: str


@dataclass(frozen=True, slots=True)
class LaunchVm(IoRequest):
    """Start QEMU for a guest: answered ``{"pid"}`` once its QMP greeting came."""

    name: str
    vcpus: int
    ram_mib: int
    accel: str
    qmp: str
    overlay: str | None


@dataclass(frozen=True, slots=True)
class AttachVm(IoRequest):
    """Take back a guest whose QEMU may still run (``pid``, ``qmp``): ``{"alive",
    "status"}``, or a failure saying why not."""

    name: str
    pid: int
    qmp: str


@dataclass(frozen=True, slots=True)
class VmCommand(IoRequest):
    """One QMP command to a running guest; answered with its ``return`` value."""

    name: str
    command: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RemoveVmFiles(IoRequest):
    """A destroyed guest's overlay and socket go (never the base image)."""

    name: str
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VmEvent(IoInput):
    """A QMP event of a guest (``STOP``, ``RESUME``, ``SHUTDOWN``, ``BALLOON_CHANGE``...)."""

    name: str
    event: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class VmExited(IoInput):
    """A guest's QEMU process ended."""

    name: str
    pid: int
    returncode: int


CONTROL = ("vm.control",)
QUERY = ("vm.control", "vm.query")


class VmmCore(Core):
    requests = (LoadHost, MakeOverlay, LaunchVm, AttachVm, VmCommand, RemoveVmFiles)
    ops: ClassVar[dict[str, str]] = {
        **Core.ops, "vm.create": "op_create", "vm.start": "op_start", "vm.pause": "op_pause",
        "vm.resume": "op_resume", "vm.stop": "op_stop", "vm.destroy": "op_destroy",
        "vm.balloon": "op_balloon", "vm.list": "op_list", "vm.pool": "op_pool"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.vms: dict[str, dict[str, Any]] = {}
        self.pool: dict[str, Any] = {"vcpus": 256, "reserve_mib": 1024, "accel": "auto"}
        self.host: dict[str, Any] | None = None
        self._steps: dict[int, tuple[str, str, list[ReplyCap], dict[str, Any]]] = {}
        self._stopping: dict[str, tuple[str, list[ReplyCap]]] = {}  # name -> (how, askers)
        self._starting: dict[str, tuple[int, int]] = {}  # name -> (vcpus, ram) being launched
        self._defining: set[str] = set()  # names whose overlay is being made (not yet defined)
        self._removing: dict[str, list[ReplyCap]] = {}  # name -> askers of its destroy
        self._actual: dict[str, int] = {}  # name -> the balloon's size as QEMU last said
        self._audit: dict[str, str] = {}  # name -> the QMP socket pd-vmm never uses
        self._waiting_host: list[tuple[str, Message, dict[str, Any]]] = []
        self.host_error: str | None = None
        self._host_asked = False
        self._host_rid: int | None = None  # the host read under way
        self._waiting_next: list[tuple[str, Message, dict[str, Any]]] = []

    # ------------------------------------------------------------------ start
    def start(self, view: PdView, now: float) -> list[Action]:
        actions = super().start(view, now)
        section = view.owned.get("vm") or {}
        self.vms = {k: dict(v) for k, v in (section.get("vms") or {}).items()}
        if section.get("pool"):
            self.pool = dict(section["pool"])
        actions += self._load_host()
        for name, vm in sorted(self.vms.items()):
            if vm["state"] in ACTIVE and vm.get("pid") and vm.get("qmp"):
                rid = self.request_id()
                self._steps[rid] = ("attach", name, [], {})
                actions.append(AttachVm(rid, name, vm["pid"], vm["qmp"]))
        return actions

    # ------------------------------------------------------------------ helpers
    def _allowed(self, m: Message, objects: tuple[str, ...]) -> str | None:
        if m.obj not in objects:
            return f"{m.payload.get('op')} needs a capability on {' or '.join(objects)}"
        return None

    def _vm(self, p: dict[str, Any]) -> tuple[str | None, str | None]:
        name = p.get("name")
        if type(name) is not str or not NAME_RE.fullmatch(name):
            return None, (f"VM name {str(name)[:40]!r}: use 1-32 of a-z, 0-9 and '-', "
                          "starting with a letter or digit")
        return name, None

    def _accel(self) -> str:
        have = list((self.host or {}).get("accels") or ["tcg"])
        want = self.pool.get("accel", "auto")
        if want != "auto":
            return str(want)
        return next((a for a in ACCELS if a in have), "tcg")

    def usage(self) -> dict[str, Any]:
        """Capacity, used, free and reserve: what admission uses and pd-fleet reports."""
        used_cpu = sum(v["vcpus"] for v in self.vms.values() if v["state"] in ACTIVE)
        used_ram = sum(v["ram_mib"] for v in self.vms.values() if v["state"] in ACTIVE)
        used_cpu += sum(c for c, _ in self._starting.values())
        used_ram += sum(r for _, r in self._starting.values())
        host = self.host or {}
        reserve = int(self.pool.get("reserve_mib", 0))
        ram = max(0, int(host.get("mem_mib", 0)) - reserve)
        cap = int(self.pool.get("vcpus", 0))
        return {"vcpus": {"capacity": cap, "used": used_cpu, "free": max(0, cap - used_cpu)},
                "ram_mib": {"capacity": ram, "used": used_ram, "free": max(0, ram - used_ram),
                            "reserve": reserve, "host": host.get("mem_mib")},
                "load": host.get("load"), "cpus": host.get("cpus"), "accel": self._accel(),
                "supervision": host.get("supervision"), "host_error": self.host_error,
                "guests": {s: sum(1 for v in self.vms.values() if v["state"] == s)
                           for s in sorted({v["state"] for v in self.vms.values()})}}

    # ------------------------------------------------------------------ operations
    def op_create(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        why = self._allowed(m, CONTROL)
        if why is not None:
            return self.error(m, why)
        # The profiles and the host are read afresh first: an edited profiles file, and
        # the RAM free now, count (and a bad file is this command's clear error).
        return self._after_host("create", m, p)

    def _create(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        assert self.host is not None
        profiles, limits = self.host["profiles"], self.host["limits"]
        profile = p.get("profile")
        if type(profile) is not str or profile not in profiles:
            return self.error(m, f"no profile {str(profile)[:40]!r} (profiles: "
                                 f"{', '.join(sorted(profiles))})")
        prof = profiles[profile]
        vcpus, ram = p.get("vcpus", prof["vcpus"]), p.get("ram_mib", prof["ram_mib"])
        for what, value, (lo, hi) in (("vcpus", vcpus, limits["vcpus"]),
                                      ("RAM (MiB)", ram, limits["ram_mib"])):
            if type(value) is not int or not lo <= value <= hi:
                return self.error(m, f"{what} {str(value)[:20]}: not {lo}-{hi} (the limits "
                                     "of the profiles file)")
        name = p.get("name")
        if name is None:
            name = next((f"{profile}-{i}" for i in range(1, 100_000)
                         if f"{profile}-{i}" not in self.vms
                         and f"{profile}-{i}" not in self._defining), "")
        name, bad = self._vm({"name": name})
        if bad is not None or name is None:
            return self.error(m, bad or "bad name")
        if name in self.vms or name in self._defining:
            return self.error(m, f"VM {name} exists already")
        if len(self.vms) + len(self._defining) >= MAX_GUESTS:
            return self.error(m, f"at most {MAX_GUESTS} guests are defined on a node "
                                 "(destroy one first)")
        if p.get("start", False) not in (True, False):
            return self.error(m, "start: true or false")
        if p.get("start"):  # one that cannot start is not even defined
            misfit = self._misfit(name, vcpus, ram)
            if misfit is not None:
                return [Reply(m.reply, {"ok": False, "error": misfit})] if m.reply else []
        image = prof.get("image")
        overlay = None if image is None else f"{self.host['vm_dir']}/{name}.qcow2"
        event = VmDefined(name, profile, vcpus, ram, image, overlay)
        after = {"event": event, "start": p.get("start", False)}
        if image is not None:
            rid = self.request_id()
            self._steps[rid] = ("overlay", name, [m.reply] if m.reply else [], after)
            self._defining.add(name)
            return [MakeOverlay(rid, image, str(overlay))]
        return self._define(name, [m.reply] if m.reply else [], after)

    def _define(self, name: str, askers: list[ReplyCap], after: dict[str, Any]) -> list[Action]:
        e: VmDefined = after["event"]
        self.vms[name] = {"name": name, "profile": e.profile, "vcpus": e.vcpus,
                          "ram_mib": e.ram_mib, "image": e.image, "overlay": e.overlay,
                          "state": "defined", "accel": None, "pid": None, "qmp": None,
                          "balloon_mib": None, "since": None}
        actions: list[Action] = [Append(e)]
        if after["start"]:
            return actions + self._start(name, askers)
        return actions + [Reply(r, {"ok": True, "vm": self._public(name, 0.0)}) for r in askers]

    def op_start(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "start")
        if why is not None or name is None:
            return self.error(m, why or "")
        return self._after_host("start", m, p)

    def _start_asked(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "start")  # again: it may have changed meanwhile
        if why is not None or name is None:
            return self.error(m, why or "")
        return self._start(name, [m.reply] if m.reply else [])

    def _misfit(self, name: str, vcpus: int, ram_mib: int) -> str | None:
        """Why a guest of this size cannot start now (admission), with the numbers."""
        use = self.usage()
        cpu, ram = use["vcpus"], use["ram_mib"]
        if vcpus <= cpu["free"] and ram_mib <= ram["free"]:
            return None
        return (f"{self.name}: {name} does not fit: asked {vcpus} vCPUs and {ram_mib} MiB; "
                f"free {cpu['free']} of {cpu['capacity']} vCPUs and {ram['free']} of "
                f"{ram['capacity']} MiB (host {ram['host']} MiB, reserve {ram['reserve']} MiB)")

    def _start(self, name: str, askers: list[ReplyCap]) -> list[Action]:
        vm = self.vms[name]
        why = self._misfit(name, vm["vcpus"], vm["ram_mib"])
        if why is not None:
            return [Reply(r, {"ok": False, "error": why}) for r in askers]
        if name in self._starting:
            return [Reply(r, {"ok": False, "error": f"{self.name}: {name} is starting"})
                    for r in askers]
        self._starting[name] = (vm["vcpus"], vm["ram_mib"])
        accel = self._accel()
        qmp = f"{(self.host or {}).get('vm_dir')}/{name}.qmp"
        rid = self.request_id()
        self._steps[rid] = ("launch", name, askers, {"accel": accel, "qmp": qmp})
        return [LaunchVm(rid, name, vm["vcpus"], vm["ram_mib"], accel, qmp, vm["overlay"])]

    def _check(self, m: Message, p: dict[str, Any], op: str) -> tuple[str | None, str | None]:
        why = self._allowed(m, CONTROL)
        if why is not None:
            return None, why
        name, bad = self._vm(p)
        if bad is not None or name is None:
            return None, bad
        vm = self.vms.get(name)
        return name, refused(op, name, None if vm is None else vm["state"]) or self._busy(
            name, op)

    def _busy(self, name: str, op: str) -> str | None:
        """Why ``op`` cannot be done now, while another operation on ``name`` is under
        way (one that a second could undo or race: the files going, a launch)."""
        if name in self._removing and op != "destroy":
            return f"{name} is being destroyed"
        if op == "destroy" and name in self._starting:
            return f"{name} is starting: destroy it once it has started"
        if op == "stop" and self._stopping.get(name, ("",))[0] == "destroy":
            return f"{name} is being destroyed"
        return None

    def _command(self, name: str, command: str, askers: list[ReplyCap], step: str,
                 arguments: dict[str, Any] | None = None, **extra: Any) -> list[Action]:
        rid = self.request_id()
        self._steps[rid] = (step, name, askers, extra)
        return [VmCommand(rid, name, command, arguments or {})]

    def op_pause(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "pause")
        if why is not None or name is None:
            return self.error(m, why or "")
        return self._command(name, "stop", [m.reply] if m.reply else [], "pause")

    def op_resume(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "resume")
        if why is not None or name is None:
            return self.error(m, why or "")
        return self._command(name, "cont", [m.reply] if m.reply else [], "resume")

    def op_stop(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "stop")
        if why is not None or name is None:
            return self.error(m, why or "")
        askers = [m.reply] if m.reply else []
        if name in self._stopping:
            self._stopping[name][1].extend(askers)
            return []
        self._stopping[name] = ("powerdown", askers)
        return [*self._command(name, "system_powerdown", [], "powerdown"),
                SetTimer(f"stop:{name}", STOP_TIMEOUT)]

    def op_destroy(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        name, why = self._check(m, p, "destroy")
        if why is not None or name is None:
            return self.error(m, why or "")
        askers = [m.reply] if m.reply else []
        if self.vms[name]["state"] in ACTIVE:
            how, waiting = self._stopping.get(name, ("", []))
            if how == "destroy":  # asked twice: both are answered when it is gone
                waiting.extend(askers)
                return []
            self._stopping[name] = ("destroy", askers)
            why = f"{self.name}: {name}: a destroy came while it stopped (it is being destroyed)"
            overtaken: list[Action] = [Reply(r, {"ok": False, "error": why}) for r in waiting]
            if how == "quit":  # already asked to quit: its end completes the destroy
                return overtaken
            return overtaken + self._command(name, "quit", [], "quit")
        return self._remove(name, askers)

    def _remove(self, name: str, askers: list[ReplyCap]) -> list[Action]:
        vm = self.vms.get(name) or {}
        paths = tuple(p for p in (vm.get("overlay"), vm.get("qmp")) if p)
        if name in self._removing:  # asked twice: one removal answers both
            self._removing[name].extend(askers)
            return []
        self._removing[name] = askers = list(askers)
        rid = self.request_id()
        self._steps[rid] = ("remove", name, askers, {})
        return [RemoveVmFiles(rid, name, paths)]

    def op_balloon(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        why = self._allowed(m, CONTROL)
        name, bad = self._vm(p)
        why = why or bad
        vm = self.vms.get(name or "")
        mib = p.get("mib")
        if why is None and vm is None:
            why = f"no VM {name!r}"
        if why is None and vm is not None and vm["state"] not in ACTIVE:
            why = f"{name} is {vm['state']}: a balloon needs a running guest"
        if why is None and vm is not None and (type(mib) is not int
                                               or not 1 <= mib <= vm["ram_mib"]):
            why = f"balloon {str(mib)[:20]} MiB: not 1-{vm['ram_mib']} (its RAM)"
        if why is not None or name is None or type(mib) is not int:
            return self.error(m, why or "")
        return self._command(name, "balloon", [m.reply] if m.reply else [], "balloon",
                             {"value": mib * MIB}, mib=mib)

    def op_list(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        why = self._allowed(m, QUERY)
        if why is not None:
            return self.error(m, why)
        if m.reply is None:
            return []
        return [Reply(m.reply, {"ok": True, "vms": [self._public(n, now)
                                                   for n in sorted(self.vms)]})]

    def op_pool(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        why = self._allowed(m, QUERY)
        if why is not None:
            return self.error(m, why)
        if m.reply is None:
            return []
        return self._after_host("pool", m, p)

    def _after_host(self, op: str, m: Message, p: dict[str, Any]) -> list[Action]:
        """Do ``op`` once the host and the profiles have been read after it was asked
        (a read already under way may predate an edit: the op waits for the next)."""
        if self._host_asked:
            self._waiting_next.append((op, m, p))
            return []
        self._waiting_host.append((op, m, p))
        return self._load_host()

    def _load_host(self) -> list[Action]:
        if self._host_asked:
            return []
        self._host_asked = True
        self._host_rid = self.request_id()
        return [LoadHost(self._host_rid)]

    def _public(self, name: str, now: float) -> dict[str, Any]:
        vm = self.vms[name]
        since = vm.get("since")
        return {**{k: vm.get(k) for k in ("name", "profile", "state", "vcpus", "ram_mib",
                                          "accel", "pid", "qmp", "image", "overlay")},
                "audit_qmp": self._audit.get(name) if vm["state"] in ACTIVE else None,
                "balloon_target_mib": vm.get("balloon_mib"),
                "balloon_actual_mib": self._actual.get(name),
                "uptime": None if vm["state"] not in ACTIVE or since is None
                else round(max(0.0, now - since), 1)}

    # ------------------------------------------------------------------ answers
    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        if answer.request_id in self._steps:
            step, name, askers, extra = self._steps.pop(answer.request_id)
            return self._step(step, name, askers, extra, answer, now)
        if answer.request_id != self._host_rid:
            return []  # nobody asked for it (never taken for the host)
        return self._host_loaded(answer, now)

    def _host_loaded(self, answer: IoAnswer, now: float) -> list[Action]:
        """The host read (at start, and afresh for each ``vm.pool``).  A failure keeps
        what was read before and says why in ``vm.pool``; the next command reads it
        again (a fixed profiles file is picked up without a restart)."""
        self._host_asked, self._host_rid = False, None
        waiting = self._waiting_host
        self._waiting_host, self._waiting_next = self._waiting_next, []
        actions: list[Action] = self._load_host() if self._waiting_host else []
        if not isinstance(answer, IoResult) or type(answer.value) is not dict:
            error = getattr(answer, "error", "an odd answer")
            self.host_error = f"cannot read the host or the profiles: {error}"
            for op, m, _ in waiting:
                if op == "pool" and self.host is not None and m.reply is not None:
                    actions.append(Reply(m.reply, {"ok": True, **self.usage()}))
                else:
                    actions += self.error(m, self.host_error)
            return actions
        self.host, self.host_error = dict(answer.value), None
        for op, m, p in waiting:
            if op == "pool" and m.reply is not None:
                actions.append(Reply(m.reply, {"ok": True, **self.usage()}))
            elif op == "create":
                actions += self._create(m, p, now)
            elif op == "start":
                actions += self._start_asked(m, p, now)
        return actions

    def _step(self, step: str, name: str, askers: list[ReplyCap], extra: dict[str, Any],
              answer: IoAnswer, now: float) -> list[Action]:
        ok = isinstance(answer, IoResult)
        error = None if ok else getattr(answer, "error", "failed")
        value = answer.value if isinstance(answer, IoResult) and type(
            answer.value) is dict else {}
        vm = self.vms.get(name)
        if step == "attach":
            if vm is None or vm["state"] not in ACTIVE:
                return []
            alive = ok and value.get("alive") is True
            if alive:
                self._observed(name, value)
                found = {"paused": "STOP", "running": "RESUME"}.get(str(value.get("status")))
                return [Append(VmReattached(name, int(vm["pid"]))),
                        *([] if found is None else
                          self._seen(name, found, "found so at re-attachment", now))]
            self._lost(name)
            return [Append(VmLost(name, f"gone while the node was down ({error or 'dead'})"
                                  [:300]))]
        if step == "launch":
            self._starting.pop(name, None)
        elif step == "remove":
            self._removing.pop(name, None)
        elif step == "overlay":
            self._defining.discard(name)
        if not ok:
            if step == "launch":
                self._starting.pop(name, None)
            if step in ("powerdown", "quit") and name in self._stopping:
                _, waiting = self._stopping.pop(name)
                askers = askers + waiting
            return [Reply(r, {"ok": False, "error": f"{self.name}: {name}: {error}"})
                    for r in askers]
        if step == "overlay":
            return self._define(name, askers, extra)
        if step == "launch" and vm is None:
            # Its record went while QEMU started: that QEMU is no guest's, and goes
            # again (nothing is recorded of it).
            rid = self.request_id()
            self._steps[rid] = ("orphan", name, [], {})
            return [VmCommand(rid, name, "quit", {}),
                    *[Reply(r, {"ok": False, "error": f"{self.name}: {name} changed while "
                                "it started"}) for r in askers]]
        if step == "launch" and vm is not None:
            pid = value.get("pid")
            if type(pid) is not int:
                return [Reply(r, {"ok": False, "error": f"{self.name}: no pid for {name}"})
                        for r in askers]
            vm.update(state="running", pid=pid, qmp=extra["qmp"], accel=extra["accel"],
                      since=now)
            self._observed(name, value)
            return [Append(VmStarted(name, pid, extra["qmp"], extra["accel"])),
                    *[Reply(r, {"ok": True, "vm": self._public(name, now)}) for r in askers]]
        if step in ("pause", "resume") and vm is not None:
            return [*self._seen(name, "STOP" if step == "pause" else "RESUME", "asked", now),
                    *[Reply(r, {"ok": True, "vm": self._public(name, now)}) for r in askers]]
        if step == "balloon" and vm is not None:
            vm["balloon_mib"] = extra["mib"]
            self._observed(name, value)
            return [Append(VmBalloonSet(name, extra["mib"])),
                    *[Reply(r, {"ok": True, "vm": self._public(name, now)}) for r in askers]]
        if step == "remove":
            self.vms.pop(name, None)
            self._actual.pop(name, None)
            self._audit.pop(name, None)
            return [Append(VmDestroyed(name)),
                    *[Reply(r, {"ok": True, "destroyed": name}) for r in askers]]
        return []  # powerdown and quit are answered when the process ends

    def _observed(self, name: str, value: dict[str, Any]) -> None:
        """What the adapter saw of a guest: its balloon's size, its audit socket."""
        actual = value.get("actual")
        if type(actual) is int and actual >= 0:
            self._actual[name] = actual // MIB
        audit = value.get("audit_qmp")
        if type(audit) is str and len(audit) <= 200:
            self._audit[name] = audit

    def _seen(self, name: str, event: str, why: str, now: float) -> list[Action]:
        """A guest paused or resumed (QMP said so, or our command returned): recorded
        once, whichever comes first."""
        vm = self.vms.get(name)
        if vm is None:
            return []
        if event == "STOP" and vm["state"] == "running":
            vm["state"] = "paused"
            return [Append(VmPaused(name, why))]
        if event == "RESUME" and vm["state"] == "paused":
            vm["state"] = "running"
            return [Append(VmResumed(name, why))]
        return []

    def _lost(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is not None:
            vm.update(state="lost", pid=None)
        self._actual.pop(name, None)

    def timer(self, name: str, now: float) -> list[Action]:
        if not name.startswith("stop:"):
            return super().timer(name, now)
        vm = name.removeprefix("stop:")
        if vm not in self._stopping or self._stopping[vm][0] != "powerdown":
            return []
        self._stopping[vm] = ("quit", self._stopping[vm][1])
        return self._command(vm, "quit", [], "quit")

    def input(self, event: IoInput, now: float) -> list[Action]:
        if isinstance(event, VmEvent):
            if event.event == "BALLOON_CHANGE":
                actual = event.data.get("actual")
                if type(actual) is int and actual >= 0:
                    self._actual[event.name] = actual // MIB
                return []
            if event.event in ("STOP", "RESUME"):
                return self._seen(event.name, event.event, f"QMP {event.event}", now)
            return []
        if not isinstance(event, VmExited):
            return []
        vm = self.vms.get(event.name)
        if vm is None or vm["state"] not in ACTIVE or vm.get("pid") != event.pid:
            return []  # not ours, or already accounted for
        stopping = self._stopping.pop(event.name, None)
        if stopping is None:
            self._lost(event.name)
            return [Append(VmLost(event.name, f"QEMU exited unasked (status "
                                  f"{event.returncode})"))]
        how, askers = stopping
        if how == "powerdown" and event.returncode < 0:  # killed, not powered down
            self._lost(event.name)
            return [Append(VmLost(event.name, f"QEMU killed during its stop (status "
                                  f"{event.returncode})")),
                    *[Reply(r, {"ok": False, "error": f"{self.name}: {event.name} was "
                                "lost during its stop"}) for r in askers]]
        if how == "destroy":
            vm.update(state="stopped", pid=None)
            return self._remove(event.name, askers)
        vm.update(state="stopped", pid=None, since=now)
        return [Append(VmStopped(event.name, how)),
                *[Reply(r, {"ok": True, "vm": self._public(event.name, now)})
                  for r in askers]]

    def status(self) -> dict[str, Any]:
        return {**super().status(), "vms": len(self.vms), "host_loaded": self.host is not None}
