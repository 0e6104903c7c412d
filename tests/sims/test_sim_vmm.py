"""pd-vmm in the deterministic host, on the simulated QEMU (``sims/backends/qemu.py``):
the lifecycle table, admission with the numbers, QMP's word as the truth (a pause seen
on QMP is recorded), lost guests, re-attachment after a node restart with no guest
started twice, and the capability every operator command needs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from ledger import audit
from ledger.catalog import VmPool
from sims.backends.qemu import SimQemu
from sims.host import World
from sims.node import SimNode, boot_node, build_node, scratch_directory


class Vmm:
    """A simulated node with a simulated QEMU, driven as the operator drives it."""

    def __init__(self, directory: Path, pool: VmPool | None = None) -> None:
        self.world = World(rng=random.Random("ppn-sim-vmm"))
        self.qemu = SimQemu(self.world)
        self.node: SimNode = build_node(directory, 31, world=self.world,
                                        adapters={"pd-vmm": self.qemu}, pool=pool)
        self.world.run_for(1)

    def admin_cap(self) -> int:
        return next(c.cap_id for c in self.node.kernel.state.caps.values()
                    if c.obj == "endpoint:pd-network-admin" and c.parent is None)

    def cmd(self, op: str, run: float = 1.0, **fields: Any) -> dict[str, Any]:
        answers: list[Any] = []
        self.node.kernel.operator().call(self.admin_cap(), {"op": op, **fields},
                                         answers.append)
        self.world.run_for(run)
        assert len(answers) == 1, f"{op}: {answers}"
        out: dict[str, Any] = answers[0]
        return out

    def state(self, name: str) -> str | None:
        vm = self.node.ledger.state.vms.get(name)
        return None if vm is None else vm.state

    def events(self) -> list[str]:
        return [type(e.event).__name__ for e in audit.entries(self.node.directory)
                if type(e.event).__name__.startswith("Vm")
                and type(e.event).__name__ != "VmPool"]

    def restart(self) -> None:
        """kill -9 of the node (its cores gone, no event), and ``ppn node run`` again."""
        old = self.node
        for pd in list(old.host.cells):
            old.host.stop(pd)
        self.node = boot_node(old.name, old.directory, old.keys, old.ledger, 31,
                              world=self.world, clock=self.world.clock,
                              adapters={"pd-vmm": self.qemu})
        self.world.run_for(1)


@pytest.fixture
def vmm() -> Iterator[Vmm]:
    with scratch_directory("ppn-simvmm-") as d, structlog.testing.capture_logs():
        v = Vmm(d / "n")
        try:
            yield v
        finally:
            v.node.close()


def test_a_guests_life_is_the_table(vmm: Vmm) -> None:
    made = vmm.cmd("vm.create", profile="tiny", name="web-1", start=True)
    assert made["ok"] and made["vm"]["state"] == "running" and made["vm"]["accel"] == "kvm"
    assert vmm.state("web-1") == "running" and vmm.qemu.procs["web-1"].status == "running"
    bad = vmm.cmd("vm.resume", name="web-1")
    assert bad["ok"] is False and "cannot resume web-1: it is running (only from paused)" \
        in bad["error"]
    assert vmm.cmd("vm.pause", name="web-1")["vm"]["state"] == "paused"
    assert vmm.qemu.procs["web-1"].status == "paused" and vmm.state("web-1") == "paused"
    assert vmm.cmd("vm.resume", name="web-1")["vm"]["state"] == "running"
    # Stop: ACPI powerdown, which a guest without an OS ignores, then quit after 10 s.
    stopped = vmm.cmd("vm.stop", name="web-1", run=12)
    assert stopped["ok"] and stopped["vm"]["state"] == "stopped"
    assert "web-1" not in vmm.qemu.procs
    assert vmm.cmd("vm.start", name="web-1")["vm"]["state"] == "running"
    assert vmm.cmd("vm.destroy", name="web-1")["destroyed"] == "web-1"
    assert vmm.state("web-1") is None and vmm.qemu.procs == {} and vmm.qemu.files == set()
    assert vmm.events() == ["VmDefined", "VmStarted", "VmPaused", "VmResumed", "VmStopped",
                            "VmStarted", "VmDestroyed"]
    assert vmm.cmd("vm.start", name="web-1")["error"].endswith("no VM 'web-1'")


def test_qmp_is_the_truth_and_a_dead_process_is_lost(vmm: Vmm) -> None:
    vmm.cmd("vm.create", profile="tiny", name="a", start=True)
    # Paused through another QMP connection (not pd-vmm): recorded all the same.
    proc = vmm.qemu.procs["a"]
    proc.status = "paused"
    from actors.pds.pd_vmm import VmEvent
    vmm.qemu._emit(VmEvent("a", "STOP", {}))
    vmm.world.run_for(0.1)
    assert vmm.state("a") == "paused"
    vmm.qemu.kill("a")
    vmm.world.run_for(0.1)
    assert vmm.state("a") == "lost" and vmm.events()[-1] == "VmLost"
    listed = vmm.cmd("vm.list")["vms"]
    assert [(v["name"], v["state"], v["pid"]) for v in listed] == [("a", "lost", None)]
    assert vmm.cmd("vm.start", name="a")["vm"]["state"] == "running"  # lost -> start


def test_a_restarted_node_reattaches_and_starts_nothing_twice(vmm: Vmm) -> None:
    for name in ("g1", "g2", "g3"):
        vmm.cmd("vm.create", profile="tiny", name=name, start=True)
    vmm.cmd("vm.pause", name="g2")
    launches = vmm.qemu.launches
    pids = {n: p.pid for n, p in vmm.qemu.procs.items()}
    vmm.restart()  # all still running
    assert vmm.qemu.launches == launches and {n: p.pid for n, p in vmm.qemu.procs.items()} \
        == pids
    assert [vmm.state(n) for n in ("g1", "g2", "g3")] == ["running", "paused", "running"]
    assert vmm.events().count("VmReattached") == 3
    vmm.qemu.kill("g3")  # dies while the node is down: lost when it comes back
    old = vmm.node
    for pd in list(old.host.cells):
        old.host.stop(pd)
    vmm.world.run_for(1)
    vmm.restart()
    assert vmm.state("g3") == "lost" and vmm.state("g1") == "running"
    assert vmm.qemu.launches == launches


def test_admission_refuses_what_does_not_fit_with_the_numbers(tmp_path: Path) -> None:
    with scratch_directory("ppn-simvmm-") as d, structlog.testing.capture_logs():
        v = Vmm(d / "n", VmPool(vcpus=16, reserve_mib=1024, accel="tcg"))
        try:
            for i in range(16):
                assert v.cmd("vm.create", profile="tiny", name=f"t{i}", start=True)["ok"]
            assert len(v.qemu.procs) == 16
            no = v.cmd("vm.create", profile="tiny", name="t16", start=True)
            assert no["ok"] is False and "asked 1 vCPUs and 32 MiB; free 0 of 16 vCPUs" \
                in no["error"] and "reserve 1024 MiB" in no["error"]
            assert v.state("t16") is None and len(v.qemu.procs) == 16  # nothing recorded
            assert v.cmd("vm.create", profile="tiny", name="t16")["ok"]  # defined: fits
            no = v.cmd("vm.start", name="t16")
            assert no["ok"] is False and "free 0 of 16 vCPUs" in no["error"]
            assert v.state("t16") == "defined" and len(v.qemu.procs) == 16
            pool = v.cmd("vm.pool")
            assert pool["vcpus"] == {"capacity": 16, "used": 16, "free": 0}
            assert pool["ram_mib"]["used"] == 16 * 32 and pool["accel"] == "tcg"
            assert v.cmd("vm.list")["vms"][0]["accel"] == "tcg"
        finally:
            v.node.close()


@pytest.mark.parametrize(("fields", "needle"), [
    ({"profile": "huge"}, "no profile 'huge'"),
    ({"profile": "tiny", "name": "Bad_Name"}, "VM name 'Bad_Name'"),
    ({"profile": "tiny", "name": "x" * 33}, "VM name"),
    ({"profile": "tiny", "vcpus": 0}, "vcpus 0: not 1-32"),
    ({"profile": "tiny", "ram_mib": 1 << 30}, "RAM (MiB)"),
    ({"profile": "tiny", "vcpus": "2"}, "vcpus 2: not 1-32"),
    ({"profile": "tiny", "start": "yes"}, "start: true or false"),
])
def test_bad_requests_record_nothing_and_start_nothing(vmm: Vmm, fields: dict[str, Any],
                                                       needle: str) -> None:
    before = vmm.events()
    out = vmm.cmd("vm.create", **fields)
    assert out["ok"] is False and needle in out["error"]
    assert vmm.events() == before and vmm.qemu.procs == {}


def test_the_operator_needs_the_capability_on_vm_control(vmm: Vmm) -> None:
    state = vmm.node.kernel.state
    control = next(c for c in state.caps.values()
                   if c.holder == "pd-network-admin" and c.obj == "vm.control")
    assert control.parent is not None
    vmm.node.kernel.operator().revoke(control.parent)
    vmm.world.run_for(0.1)
    out = vmm.cmd("vm.create", profile="tiny", name="x", start=True)
    assert out["ok"] is False and f"capability #{control.cap_id} on vm.control" in out["error"]
    assert vmm.events() == [] and vmm.qemu.procs == {}
    assert vmm.cmd("vm.list")["ok"] is True  # vm.query is a capability of its own


def test_a_guest_killed_during_its_stop_is_lost_not_stopped(vmm: Vmm) -> None:
    """kill -9 of QEMU while pd-vmm waits for the ACPI powerdown: the guest did not power
    down, it was lost (and the stop's caller is told so)."""
    assert vmm.cmd("vm.create", profile="tiny", name="k1", start=True)["ok"]
    answers: list[Any] = []
    vmm.node.kernel.operator().call(vmm.admin_cap(), {"op": "vm.stop", "name": "k1"},
                                    answers.append)
    vmm.world.run_for(1)  # powerdown asked; no OS answers it
    assert answers == [] and vmm.state("k1") == "running"
    vmm.qemu.kill("k1")
    vmm.world.run_for(1)
    assert answers and answers[0]["ok"] is False and "lost during its stop" in \
        answers[0]["error"]
    assert vmm.state("k1") == "lost" and vmm.events()[-1] == "VmLost"
    assert "VmStopped" not in vmm.events()


def test_the_number_of_defined_guests_is_bounded_and_list_fits_one_message(vmm: Vmm) -> None:
    """Without a bound, enough defined (not running) guests made ``vm.list`` larger than
    one kernel message: the reply was refused and the operator waited for nothing."""
    from actors.pds import pd_vmm
    from actors.wire import MAX_MESSAGE_BYTES, encode

    limit = pd_vmm.MAX_GUESTS
    core = vmm.node.host.cells["pd-vmm"].core
    for i in range(limit):  # defined straight into the core: a thousand calls are slow
        name = f"g{i:04d}-" + "x" * 26
        core.vms[name] = {"name": name, "profile": "tiny", "vcpus": 1, "ram_mib": 32,
                          "image": None, "overlay": None, "state": "defined", "accel": None,
                          "pid": None, "qmp": None, "balloon_mib": None, "since": None}
    no = vmm.cmd("vm.create", profile="tiny", name="one-more")
    assert no["ok"] is False and f"at most {limit} guests" in no["error"]
    listed = vmm.cmd("vm.list")
    assert listed["ok"] and len(listed["vms"]) == limit
    assert len(encode(listed)) < MAX_MESSAGE_BYTES
