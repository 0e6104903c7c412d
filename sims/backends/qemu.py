"""The simulated twin of pd-vmm's QEMU adapter: guests as processes in virtual time.

It answers pd-vmm's requests as the real adapter does (``actors/io/qemu.py``): the
profiles and the host (given, not read), overlays, launches (a pid once the "QMP
greeting" came), re-attachment, QMP commands (``stop``, ``cont``, ``system_powerdown``,
``quit``, ``balloon``, ``query-status``, ``query-balloon``) with their events (``STOP``,
``RESUME``, ``SHUTDOWN``, ``BALLOON_CHANGE``), and a process's end (``VmExited``).  A
guest has no OS: ACPI powerdown does nothing, and the balloon's actual size never moves.
:meth:`SimQemu.kill` is ``kill -9`` of a guest's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors import vm_config
from actors.io.base import Answer, Emit
from actors.pds.base import IoFailure, IoRequest, IoResult
from actors.pds.pd_vmm import (
    AttachVm,
    LaunchVm,
    LoadHost,
    MakeOverlay,
    RemoveVmFiles,
    VmCommand,
    VmEvent,
    VmExited,
)

if TYPE_CHECKING:
    from sims.host import World

NS = 1_000_000_000
LAUNCH_NS = 300_000_000  # firmware start to the QMP greeting (TCG, disk-less: ~0.3 s)
ANSWER_NS = 200_000

_SHIPPED = vm_config.load()  # the same profiles and limits as a real node's
PROFILES: dict[str, dict[str, Any]] = _SHIPPED["profiles"]
LIMITS: dict[str, list[int]] = _SHIPPED["limits"]


@dataclass
class _Proc:
    pid: int
    name: str
    ram_mib: int
    status: str = "running"  # or "paused"
    balloon_mib: int = 0


class SimQemu:
    """One node's simulated QEMU processes."""

    def __init__(self, world: World, *, mem_mib: int = 24 * 1024, cpus: int = 2,
                 accels: tuple[str, ...] = ("kvm", "tcg"),
                 profiles: dict[str, dict[str, Any]] | None = None,
                 vm_dir: str = "/sim/vms") -> None:
        self.world = world
        self.host = {"profiles": profiles or PROFILES, "limits": LIMITS, "mem_mib": mem_mib,
                     "cpus": cpus, "load": 0.0, "accels": list(accels), "vm_dir": vm_dir}
        self.procs: dict[str, _Proc] = {}
        self.files: set[str] = set()
        self.launches = 0
        self._next_pid = 1000
        self._emit: Emit = lambda event: None
        self.fail_launch: str | None = None  # a QEMU that exits at once, with this stderr

    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def close(self) -> None:
        pass

    def kill(self, name: str, code: int = -9) -> None:
        """``kill -9`` of a guest's QEMU (or its end, for whatever reason)."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            self._emit(VmExited(name, proc.pid, code))

    def submit(self, request: IoRequest, answer: Answer) -> None:
        rid = request.request_id
        out: Any
        delay = ANSWER_NS
        if type(request) is LoadHost:
            out = IoResult(rid, dict(self.host))
        elif type(request) is MakeOverlay:
            self.files.add(request.overlay)
            out = IoResult(rid, {"overlay": request.overlay})
        elif type(request) is LaunchVm:
            if self.fail_launch is not None:
                out = IoFailure(rid, f"qemu exited at once (1): {self.fail_launch}")
            elif request.name in self.procs:
                out = IoFailure(rid, f"{request.name} runs already")
            else:
                self._next_pid += 1
                self.launches += 1
                self.procs[request.name] = _Proc(self._next_pid, request.name,
                                                 request.ram_mib, balloon_mib=request.ram_mib)
                self.files.add(request.qmp)
                out = IoResult(rid, {"pid": self._next_pid, "status": "running",
                                     "actual": request.ram_mib << 20,
                                     "audit_qmp": request.qmp.replace(".qmp", ".audit.qmp")})
                delay = LAUNCH_NS
        elif type(request) is AttachVm:
            proc = self.procs.get(request.name)
            if proc is None or proc.pid != request.pid:
                out = IoFailure(rid, f"no QEMU with pid {request.pid}")
            else:
                out = IoResult(rid, {"alive": True, "status": proc.status,
                                     "actual": proc.balloon_mib << 20})
        elif type(request) is VmCommand:
            out = self._command(request)
        elif type(request) is RemoveVmFiles:
            self.files.difference_update(request.paths)
            out = IoResult(rid, {"removed": len(request.paths)})
        else:
            out = IoFailure(rid, f"simulated QEMU: no such request {type(request).__name__}")
        self.world.after(delay, lambda: answer(out))

    def _command(self, r: VmCommand) -> Any:
        proc = self.procs.get(r.name)
        if proc is None:
            return IoFailure(r.request_id, f"{r.name}: no QMP connection (not running)")
        events: list[tuple[str, dict[str, Any]]] = []
        value: dict[str, Any] = {}
        if r.command == "stop":
            if proc.status == "running":
                proc.status = "paused"
                events.append(("STOP", {}))
        elif r.command == "cont":
            if proc.status == "paused":
                proc.status = "running"
                events.append(("RESUME", {}))
        elif r.command == "system_powerdown":
            events.append(("POWERDOWN", {}))  # no OS: nothing powers down
        elif r.command == "quit":
            self.world.after(ANSWER_NS * 2, lambda: self.kill(r.name, 0))
        elif r.command == "balloon":
            target = r.arguments.get("value")
            if type(target) is not int or target <= 0:
                return IoFailure(r.request_id, "balloon: bad value")
            # No guest driver: the actual size never moves (and QEMU says nothing).
            value = {"actual": proc.balloon_mib << 20}
        elif r.command == "query-status":
            value = {"status": proc.status, "running": proc.status == "running"}
        elif r.command == "query-balloon":
            value = {"actual": proc.balloon_mib << 20}
        else:
            return IoFailure(r.request_id, f"QMP: the command {r.command!r} is not known")
        for event, data in events:  # QEMU sends the event before the command's return
            self._later(VmEvent(r.name, event, data))
        return IoResult(r.request_id, value)

    def _later(self, event: VmEvent) -> None:
        self.world.after(ANSWER_NS // 2, lambda: self._emit(event))
