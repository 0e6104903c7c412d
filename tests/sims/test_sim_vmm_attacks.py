"""Attacks on pd-vmm's core (sans-I/O): operations that race one another, and odd answers.

The core is driven by hand here -- every I/O answer comes exactly when the test says --
so each race is deterministic: a destroy while a start or a stop is under way, two
destroys, two creates of one name, an answer nobody asked for, and QMP data of the
wrong shape.  Each test says in its docstring what broke before the fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.pds.base import (
    Action,
    Append,
    IoFailure,
    IoRequest,
    IoResult,
    Message,
    PdView,
    Reply,
    ReplyCap,
)
from actors.pds.pd_vmm import (
    LaunchVm,
    LoadHost,
    MakeOverlay,
    RemoveVmFiles,
    VmCommand,
    VmEvent,
    VmExited,
    VmmCore,
)

PROFILES = {"tiny": {"vcpus": 1, "ram_mib": 32, "image": None},
            "disky": {"vcpus": 1, "ram_mib": 32, "image": "/images/base.qcow2"}}
HOST = {"profiles": PROFILES, "limits": {"vcpus": [1, 32], "ram_mib": [16, 65536]},
        "mem_mib": 8192, "cpus": 2, "load": 0.0, "accels": ["tcg"], "vm_dir": "/x/vms"}


class Driver:
    """VmmCore, its pending I/O and the answers its callers got."""

    def __init__(self) -> None:
        self.core = VmmCore("pd-vmm")
        self.pending: list[IoRequest] = []
        self.replies: dict[int, list[Any]] = {}
        self.events: list[object] = []
        self.now = 0.0
        self._next = 0
        self.take(self.core.start(PdView("pd-vmm", ()), self.now))
        self.answer(LoadHost, dict(HOST))

    def take(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Append):
                self.events.append(a.event)
            elif isinstance(a, Reply):
                self.replies.setdefault(a.reply.reply_id, []).append(a.payload)
            elif isinstance(a, IoRequest):
                self.pending.append(a)

    def call(self, op: str, obj: str = "vm.control", **fields: Any) -> int:
        self._next += 1
        m = Message(obj, None, {"op": op, **fields}, reply=ReplyCap(self._next))
        self.take(self.core.handle(m, self.now))
        if any(type(r) is LoadHost for r in self.pending):  # ops that read the host first
            self.answer(LoadHost, dict(HOST))
        return self._next

    def request(self, kind: type, **match: Any) -> Any:
        found = [r for r in self.pending if type(r) is kind
                 and all(getattr(r, k) == v for k, v in match.items())]
        assert found, f"no pending {kind.__name__} {match}: {self.pending}"
        return found[0]

    def answer(self, kind: type, value: Any, fail: bool = False, **match: Any) -> None:
        r = self.request(kind, **match)
        self.pending.remove(r)
        out = IoFailure(r.request_id, str(value)) if fail else IoResult(r.request_id, value)
        self.take(self.core.io(out, self.now))

    def exited(self, name: str, pid: int, code: int = 0) -> None:
        self.take(self.core.input(VmExited(name, pid, code), self.now))

    def launch_ok(self, name: str, pid: int) -> None:
        self.answer(LaunchVm, {"pid": pid, "status": "running", "actual": 32 << 20,
                               "audit_qmp": f"/x/vms/{name}.audit.qmp"}, name=name)

    def running(self, name: str, pid: int) -> None:
        self.call("vm.create", profile="tiny", name=name, start=True)
        self.launch_ok(name, pid)
        assert self.core.vms[name]["state"] == "running"

    def answered(self, ask: int) -> Any:
        got = self.replies.get(ask, [])
        assert len(got) == 1, f"call {ask}: answered {len(got)} times: {got}"
        return got[0]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


@pytest.fixture
def d() -> Driver:
    return Driver()


def test_a_destroy_while_the_guest_starts_leaks_no_qemu_and_no_capacity(d: Driver) -> None:
    """Found: a destroy during a launch removed the record at once; the launch's answer
    then fell through (``vm`` gone), so the QEMU ran on unrecorded, its vCPUs and RAM
    stayed counted as "starting" forever, the create's caller was never answered, and
    the name could never start again ("is starting")."""
    create = d.call("vm.create", profile="tiny", name="a", start=True)
    d.request(LaunchVm, name="a")
    destroy = d.call("vm.destroy", name="a")
    assert d.answered(destroy)["ok"] is False
    assert "a is starting" in d.answered(destroy)["error"]
    assert not any(type(r) is RemoveVmFiles for r in d.pending)  # its files stay
    d.launch_ok("a", 4242)
    assert d.answered(create)["ok"] is True and d.core.vms["a"]["state"] == "running"
    assert d.core._starting == {} and d.core.usage()["vcpus"]["used"] == 1
    gone = d.call("vm.destroy", name="a")
    d.answer(VmCommand, {}, name="a", command="quit")
    d.exited("a", 4242)
    d.answer(RemoveVmFiles, {"removed": 1}, name="a")
    assert d.answered(gone) == {"ok": True, "destroyed": "a"}
    assert d.core.usage()["vcpus"]["used"] == 0 and d.core.vms == {}


def test_a_launch_answered_after_its_record_went_is_quit_not_leaked(d: Driver) -> None:
    """Found: a launch answer for a guest no longer recorded was dropped without a
    word: its QEMU ran on, unrecorded, and its capacity stayed taken."""
    create = d.call("vm.create", profile="tiny", name="a", start=True)
    del d.core.vms["a"]  # however the record went meanwhile (a future path; a PD bug)
    d.launch_ok("a", 4243)
    assert d.answered(create)["ok"] is False
    assert d.core._starting == {}
    assert d.request(VmCommand, name="a", command="quit")  # that QEMU goes again
    assert "VmStarted" not in d.kinds()


def test_a_destroy_during_a_stop_answers_the_stop(d: Driver) -> None:
    """Found: a destroy during a stop replaced the stop's waiting callers, so ``ppn vm
    stop`` was never answered and hung until its own timeout."""
    d.running("b", 100)
    stop = d.call("vm.stop", name="b")
    destroy = d.call("vm.destroy", name="b")
    assert d.answered(stop)["ok"] is False and "destroy" in d.answered(stop)["error"]
    d.exited("b", 100)
    d.answer(RemoveVmFiles, {"removed": 1}, name="b")
    assert d.answered(destroy) == {"ok": True, "destroyed": "b"}
    assert d.kinds()[-1] == "VmDestroyed" and "VmStopped" not in d.kinds()


def test_two_destroys_of_a_running_guest_are_both_answered(d: Driver) -> None:
    """Found: the second destroy replaced the first one's caller, who was never answered."""
    d.running("c", 101)
    first, second = d.call("vm.destroy", name="c"), d.call("vm.destroy", name="c")
    d.exited("c", 101)
    d.answer(RemoveVmFiles, {"removed": 1}, name="c")
    assert d.answered(first) == d.answered(second) == {"ok": True, "destroyed": "c"}
    assert d.kinds().count("VmDestroyed") == 1


def test_two_destroys_of_a_stopped_guest_remove_once_and_answer_both(d: Driver) -> None:
    """Found: each destroy sent its own RemoveVmFiles; the second answer then journalled a
    second ``VmDestroyed`` (refused by the ledger, so its caller was never answered) --
    or, had the name been created again meanwhile, removed the new guest's record."""
    d.call("vm.create", profile="tiny", name="e")
    first, second = d.call("vm.destroy", name="e"), d.call("vm.destroy", name="e")
    assert [type(r) for r in d.pending].count(RemoveVmFiles) == 1
    again = d.call("vm.start", name="e")  # nor may it start while its files go
    assert "being destroyed" in d.answered(again)["error"]
    d.answer(RemoveVmFiles, {"removed": 0}, name="e")
    assert d.answered(first) == d.answered(second) == {"ok": True, "destroyed": "e"}
    assert d.kinds().count("VmDestroyed") == 1
    made = d.call("vm.create", profile="tiny", name="e")
    assert d.answered(made)["ok"] is True and d.core.vms["e"]["state"] == "defined"


def test_a_stop_during_a_destroy_is_refused(d: Driver) -> None:
    """Found: a stop during a destroy joined the destroy's callers and was answered with
    ``{"destroyed": ...}``, which the node read as a malformed answer."""
    d.running("f", 102)
    d.call("vm.destroy", name="f")
    stop = d.call("vm.stop", name="f")
    assert d.answered(stop)["ok"] is False and "being destroyed" in d.answered(stop)["error"]


def test_two_creates_of_one_name_on_an_image_define_it_once(d: Driver) -> None:
    """Found: while the first create's overlay was being made the name was free, so a
    second create made (and first deleted) the same overlay and journalled a second
    ``VmDefined`` for the name (refused: its caller never answered)."""
    first = d.call("vm.create", profile="disky", name="g")
    second = d.call("vm.create", profile="disky", name="g")
    assert d.answered(second)["ok"] is False and "exists" in d.answered(second)["error"]
    assert [type(r) for r in d.pending].count(MakeOverlay) == 1
    auto = d.call("vm.create", profile="disky")  # an automatic name skips it too
    d.answer(MakeOverlay, {"overlay": "/x/vms/g.qcow2"}, overlay="/x/vms/g.qcow2")
    assert d.answered(first)["ok"] is True
    assert d.kinds().count("VmDefined") == 1
    d.answer(MakeOverlay, {"overlay": "/x/vms/disky-1.qcow2"})
    assert d.answered(auto)["vm"]["name"] == "disky-1"
    # A failed overlay frees the name again.
    failed = d.call("vm.create", profile="disky", name="h")
    d.answer(MakeOverlay, "qemu-img failed", fail=True)
    assert d.answered(failed)["ok"] is False
    retry = d.call("vm.create", profile="tiny", name="h")
    assert d.answered(retry)["ok"] is True


def test_an_answer_nobody_asked_for_is_not_taken_for_the_host(d: Driver) -> None:
    """Found: any I/O answer with an unknown request id was read as the host's: a stray
    ``{"pid": ...}`` replaced the host (capacity 0 MiB, and no profiles: the next
    create raised ``KeyError`` in the core)."""
    d.take(d.core.io(IoResult(9999, {"pid": 1}), d.now))
    assert d.core.host is not None and d.core.host["mem_mib"] == 8192
    made = d.call("vm.create", profile="tiny", name="i")
    assert d.answered(made)["ok"] is True


@pytest.mark.parametrize("actual", [-1 << 20, "32", True, 1.5, None])
def test_a_balloon_change_of_the_wrong_shape_is_ignored(d: Driver, actual: Any) -> None:
    """Found: a ``BALLOON_CHANGE`` with a negative ``actual`` was taken (the list showed
    a balloon of -1 MiB); the answers to launches were already checked."""
    d.running("j", 103)
    d.take(d.core.input(VmEvent("j", "BALLOON_CHANGE", {"actual": actual}), d.now))
    listed = d.answered(d.call("vm.list", obj="vm.query"))["vms"][0]
    assert listed["balloon_actual_mib"] == 32
