"""pd-vmm on real QEMU: `ppn node run` as a process, `ppn vm ...` as the operator types it.

Every guest is checked through QEMU itself: the test opens its own QMP connection on
the guest's audit socket (pd-vmm never uses that one), reads the processes in /proc,
and reads the ledger.  Guests are tiny, disk-less and run under TCG (a disk-less
guest's firmware takes ~0.3 s of CPU under TCG against ~3.6 s under KVM here), except
in the test that checks KVM is found and used.  Everything a test starts is killed at
its end, even on failure: processes are found by the test's own state directory
(prefix ``ppn10v``) in their command lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from qemu.qmp import QMPClient

from actors.io.qemu import kvm_works
from ledger import audit
from ledger.catalog import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(QEMU is None or shutil.which("qemu-img") is None,
                                 reason="needs qemu-system-x86_64 and qemu-img "
                                 "(Debian qemu-system-x86, qemu-utils)")]


def ppn(*args: str | Path, check: bool = True, timeout: float = 90
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} exited {proc.returncode}: {proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def processes_with(needle: str) -> list[int]:
    """Pids of the processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle.encode() in cmdline and stat.rpartition(")")[2].split()[:1] != ["Z"]:
            found.append(int(entry.name))
    return found


def kill_all_with(needle: str) -> None:
    for pid in processes_with(needle):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def qmp(socket_path: str, command: str = "query-status") -> Any:
    """One command on a QMP socket, over the test's own connection."""
    async def go() -> Any:
        client = QMPClient("test-audit")
        await asyncio.wait_for(client.connect(socket_path), 10)
        try:
            return await client.execute(command)
        finally:
            await client.disconnect()
    return asyncio.run(go())


class Node:
    """A state directory with `ppn node run` on it, and everything it started."""

    def __init__(self, base: Path, *init: str) -> None:
        self.base, self.state = base, base / "n"
        self.vms = self.state / "vms"
        ppn("node", "init", "--state-dir", self.state, "--name", "vm-host", *init)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def run(self) -> None:
        self._log = (self.base / "node.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.cli", "node", "run", "--state-dir",
             str(self.state), "--no-tunnel"], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 20
        while ppn("node", "status", "--state-dir", self.state, check=False).returncode != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (self.base / "node.log").read_text()[-2000:]
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ppn("vm", args[0], "--state-dir", self.state, *args[1:], check=check)

    def list(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in json.loads(self.vm("list", "--json").stdout)}

    def events(self, family: str = "vm.") -> list[tuple[str, dict[str, Any]]]:
        out = []
        for e in audit.entries(self.state / "ledger"):
            kind = REGISTRY.type_of(e.event).tag
            if kind.startswith(family):
                out.append((kind, dataclasses.asdict(e.event)))
        return out

    def qemus(self, name: str) -> list[int]:
        return processes_with(f"unix:{self.vms}/{name}.qmp,server")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        kill_all_with(str(self.base))
        if self._log is not None:
            self._log.close()


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Short: a QMP socket's path must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="ppn10v", dir="/tmp"))
    try:
        yield base
    finally:
        kill_all_with(str(base))
        if os.environ.get("PPN_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def node(scratch: Path) -> Iterator[Node]:
    n = Node(scratch, "--vm-accel", "tcg", "--vm-vcpus", "16")
    try:
        n.run()
        yield n
    finally:
        n.close()


def wait_for(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_lifecycle_each_state_checked_through_qemu_itself(node: Node) -> None:
    out = node.vm("create", "--profile", "tiny", "--name", "g1", "--start").stdout
    assert out.startswith("vm g1 (tiny): running, 1 vCPUs, 32 MiB, tcg, pid ")
    g = node.list()["g1"]
    audit_sock = g["audit_qmp"]
    assert g["state"] == "running" and g["accel"] == "tcg"
    assert g["qmp"] == f"{node.vms}/g1.qmp" and audit_sock == f"{node.vms}/g1.audit.qmp"
    assert node.qemus("g1") == [g["pid"]]
    assert qmp(audit_sock)["status"] == "running"
    cmdline = Path(f"/proc/{g['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-accel" in cmdline and b"tcg,tb-size=32" in cmdline
    assert oct(node.vms.stat().st_mode & 0o777) == "0o700"

    assert ": paused," in node.vm("pause", "g1").stdout
    assert qmp(audit_sock)["status"] == "paused"
    bad = node.vm("pause", "g1", check=False)
    assert bad.returncode == 1 and "cannot pause g1: it is paused (only from running)" \
        in bad.stderr
    assert ": running," in node.vm("resume", "g1").stdout
    assert qmp(audit_sock)["status"] == "running"
    bad = node.vm("resume", "g1", check=False)
    assert bad.returncode == 1 and "cannot resume g1: it is running" in bad.stderr

    balloon = node.vm("balloon", "g1", "16").stdout
    assert "target 16 MiB, actual 32 MiB" in balloon  # no guest driver: it never moves
    assert qmp(audit_sock, "query-balloon")["actual"] == 32 << 20
    g = node.list()["g1"]
    assert (g["balloon_target_mib"], g["balloon_actual_mib"]) == (16, 32)

    pid = g["pid"]
    t0 = time.monotonic()
    assert ": stopped," in node.vm("stop", "g1").stdout  # ACPI powerdown, then quit
    assert 9 < time.monotonic() - t0 < 30  # no OS answers the powerdown: quit after 10 s
    assert not Path(f"/proc/{pid}").exists() and node.qemus("g1") == []
    assert node.list()["g1"]["state"] == "stopped"

    assert ": running," in node.vm("start", "g1").stdout
    g = node.list()["g1"]
    assert g["pid"] != pid and qmp(g["audit_qmp"])["status"] == "running"
    assert node.vm("destroy", "g1").stdout.strip() == "vm g1 destroyed"
    assert node.qemus("g1") == [] and "g1" not in node.list()
    assert sorted(p.name for p in node.vms.iterdir()) == []
    kinds = [k for k, _ in node.events()]
    assert kinds == ["vm.pool", "vm.defined", "vm.started", "vm.paused", "vm.resumed",
                     "vm.balloon_set", "vm.stopped", "vm.started", "vm.destroyed"]
    assert ppn("ledger", "verify", node.state / "ledger").returncode == 0


def test_kill_9_of_qemu_is_lost_within_2_s(node: Node) -> None:
    node.vm("create", "--profile", "tiny", "--name", "doomed", "--start")
    node.vm("create", "--profile", "tiny", "--name", "bystander", "--start")
    pid = node.list()["doomed"]["pid"]
    os.kill(pid, signal.SIGKILL)
    took = wait_for(lambda: node.list()["doomed"]["state"] == "lost", 2.0, "lost")
    print(f"kill -9 to vm.lost: {took:.3f} s")
    lost = [p for k, p in node.events() if k == "vm.lost"]
    assert lost == [{"name": "doomed", "reason": "QEMU exited unasked (status -9)"}]
    vms = node.list()
    assert vms["doomed"]["pid"] is None and vms["bystander"]["state"] == "running"
    assert node.vm("pool", "--json").stdout and json.loads(
        node.vm("pool", "--json").stdout)["vcpus"]["used"] == 1
    assert ": running," in node.vm("start", "doomed").stdout  # a lost guest starts again


def test_kill_9_of_the_node_then_restart_reattaches_and_starts_nothing_twice(
        node: Node) -> None:
    for name in ("r1", "r2", "r3", "gone"):
        node.vm("create", "--profile", "tiny", "--name", name, "--start")
    node.vm("pause", "r2")
    before = node.list()
    node.kill9()
    os.kill(before["gone"]["pid"], signal.SIGKILL)  # dies while the node is down
    time.sleep(0.2)
    assert qmp(before["r1"]["audit_qmp"])["status"] == "running"  # guests outlive the node
    node.run()
    after = node.list()
    for name in ("r1", "r2", "r3"):
        assert after[name]["pid"] == before[name]["pid"], name
        assert after[name]["state"] == before[name]["state"], name
        assert node.qemus(name) == [before[name]["pid"]], name  # one QEMU per guest
    assert after["gone"]["state"] == "lost" and node.qemus("gone") == []
    assert qmp(after["r2"]["audit_qmp"])["status"] == "paused"
    assert qmp(after["r1"]["audit_qmp"])["status"] == "running"
    events = node.events()
    assert sorted(p["name"] for k, p in events if k == "vm.reattached") == ["r1", "r2", "r3"]
    assert [p["name"] for k, p in events if k == "vm.lost"] == ["gone"]
    assert len([k for k, _ in events if k == "vm.started"]) == 4  # none started again
    # The re-attached guests are controlled as before: QMP events reach pd-vmm again.
    assert ": running," in node.vm("resume", "r2").stdout
    os.kill(after["r3"]["pid"], signal.SIGKILL)
    wait_for(lambda: node.list()["r3"]["state"] == "lost", 2.0, "adopted guest lost")
    assert node.vm("destroy", "r1").stdout.strip() == "vm r1 destroyed"
    assert node.qemus("r1") == []


def test_sixteen_guests_at_once_and_admission_refuses_the_seventeenth(node: Node) -> None:
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def create(i: int) -> None:
        results[i] = node.vm("create", "--profile", "tiny", "--name", f"m{i}", "--start",
                             check=False)
    # Six at a time: the control socket serves at most eight clients.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(create, range(16)))
    assert all(r.returncode == 0 for r in results.values()), \
        [r.stderr for r in results.values() if r.returncode]
    vms = node.list()
    assert len(vms) == 16 and {v["state"] for v in vms.values()} == {"running"}
    for name, v in vms.items():
        assert node.qemus(name) == [v["pid"]]
        assert qmp(v["audit_qmp"])["status"] == "running"
    size = audit.verify(node.state / "ledger").records
    no = node.vm("create", "--profile", "tiny", "--name", "m16", "--start", check=False)
    assert no.returncode == 1
    assert "m16 does not fit: asked 1 vCPUs and 32 MiB; free 0 of 16 vCPUs" in no.stderr
    assert "reserve 1024 MiB" in no.stderr
    assert audit.verify(node.state / "ledger").records == size  # nothing recorded
    assert node.qemus("m16") == []
    pool = json.loads(node.vm("pool", "--json").stdout)
    assert pool["vcpus"] == {"capacity": 16, "used": 16, "free": 0}
    assert pool["ram_mib"]["used"] == 16 * 32 and pool["guests"] == {"running": 16}
    text = node.vm("pool").stdout
    assert "vCPUs: capacity 16, used 16, free 0" in text and "reserve 1024 MiB" in text


def test_a_guest_on_a_disk_image_gets_an_overlay_and_the_image_is_never_written(
        node: Node, scratch: Path) -> None:
    base = scratch / "images" / "base.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    (node.state / "vm-profiles.toml").write_text(
        '[profiles.disky]\nvcpus = 1\nram_mib = 32\nimage = "../images/base.qcow2"\n')
    digest, mtime = hashlib.sha256(base.read_bytes()).hexdigest(), base.stat().st_mtime_ns
    node.vm("create", "--profile", "disky", "--name", "d1", "--start")
    g = node.list()["d1"]
    overlay = node.vms / "d1.qcow2"
    assert g["overlay"] == str(overlay) and g["image"] == str(base) and overlay.is_file()
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      str(overlay)], capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert f"file={overlay},if=virtio,format=qcow2".encode() in Path(
        f"/proc/{g['pid']}/cmdline").read_bytes()
    assert qmp(g["audit_qmp"])["status"] == "running"
    time.sleep(1.0)  # the firmware reads the disk
    node.vm("destroy", "d1")
    assert not overlay.exists() and base.exists()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    assert base.stat().st_mtime_ns == mtime


def test_kvm_is_found_recorded_and_used_when_dev_kvm_works(scratch: Path) -> None:
    if not kvm_works():
        pytest.skip("/dev/kvm does not work on this host")
    n = Node(scratch)  # accel auto
    try:
        n.run()
        assert json.loads(n.vm("pool", "--json").stdout)["accel"] == "kvm"
        n.vm("create", "--profile", "tiny", "--name", "k1", "--start")
        g = n.list()["k1"]
        assert g["accel"] == "kvm" and qmp(g["audit_qmp"])["status"] == "running"
        assert b"kvm" in Path(f"/proc/{g['pid']}/cmdline").read_bytes().split(b"\0")
        started = [p for k, p in n.events() if k == "vm.started"]
        assert started[0]["accel"] == "kvm"
        assert "k1  " in n.vm("list").stdout and " kvm " in n.vm("list").stdout
        n.vm("destroy", "k1")
    finally:
        n.close()


@pytest.mark.parametrize(("args", "needle"), [
    (["create", "--profile", "huge"], "no profile 'huge' (profiles: mediakit, orchestration"),
    (["create", "--profile", "tiny", "--name", "Bad_Name"],
     "VM name 'Bad_Name': use 1-32 of a-z"),
    (["create", "--profile", "tiny", "--name", "x" * 33], "use 1-32 of a-z"),
    (["create", "--profile", "tiny", "--vcpus", "33"], "vcpus 33: not 1-32"),
    (["create", "--profile", "tiny", "--ram", "8"], "RAM (MiB) 8: not 16-65536"),
    (["create", "--profile", "tiny", "--ram", "-5"], "not an integer"),
    (["start", "nosuch"], "no VM 'nosuch'"),
    (["destroy", "nosuch"], "no VM 'nosuch'"),
    (["balloon", "nosuch", "16"], "no VM 'nosuch'"),
    (["pause", "../etc"], "use 1-32 of a-z"),
])
def test_bad_requests_record_nothing_and_start_nothing(node: Node, args: list[str],
                                                       needle: str) -> None:
    size = audit.verify(node.state / "ledger").records
    bad = node.vm(*args, check=False)
    assert bad.returncode in (1, 2) and needle in bad.stderr, bad.stderr
    lines = bad.stderr.strip().splitlines()  # one line (after argparse's usage, for 2)
    assert lines[-1].startswith("ppn") and needle in lines[-1]
    assert len(lines) == 1 or (bad.returncode == 2 and lines[0].startswith("usage:"))
    assert audit.verify(node.state / "ledger").records == size
    assert processes_with(str(node.vms)) == []


FAKE_QMP = r'''#!{python}
import socket, sys, time
arg = next(a for a in sys.argv if a.startswith("unix:") and ".audit." not in a)
path = arg[5:].split(",")[0]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(4)
while True:
    c, _ = s.accept()
    if "{mode}" == "garbage":
        c.sendall(b"\x00\xffnot json at all\r\n{{{{{{\n")
        time.sleep(30)
    c.close()
'''


@pytest.mark.parametrize(("mode", "needle"), [
    ("exit", "QEMU exited at once (1): qemu-system-x86_64: -m 32: invalid option"),
    ("garbage", "QMP on bad1.qmp:"),
    ("close", "QMP on bad1.qmp:"),
])
def test_a_broken_qemu_or_qmp_socket_is_a_clear_error_and_the_node_lives(
        node: Node, scratch: Path, mode: str, needle: str) -> None:
    fake = scratch / "fake-qemu"
    if mode == "exit":
        fake.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -m 32: invalid option' >&2\n"
                        "exit 1\n")
    else:
        fake.write_text(FAKE_QMP.format(python=sys.executable, mode=mode))
    fake.chmod(0o755)
    (node.state / "vm-profiles.toml").write_text(f'[qemu]\nbinary = "{fake}"\n')
    bad = node.vm("create", "--profile", "tiny", "--name", "bad1", "--start", check=False)
    assert bad.returncode == 1 and needle in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert processes_with(str(fake)) == []  # what was started is gone again
    assert node.list()["bad1"]["state"] == "defined"
    assert "vm.started" not in [k for k, _ in node.events()]
    assert ppn("node", "status", "--state-dir", node.state).returncode == 0
    (node.state / "vm-profiles.toml").unlink()  # the real QEMU again, no restart
    assert ": running," in node.vm("start", "bad1").stdout


@pytest.mark.parametrize(("text", "needle"), [
    ("[profiles.tiny]\nvcpus = 0\nram_mib = 32\n", "profiles.tiny.vcpus: 0 is not 1-32"),
    ("[profiles.tiny]\nvcpus = 1\n", "profiles.tiny: no ram_mib"),
    ("[profiles.tiny]\nvcpus = '1'\nram_mib = 32\n", "profiles.tiny.vcpus: must be a whole"),
    ("[profiles.x]\nvcpus = 1\nram_mib = 32\nimage = 'nope.qcow2'\n",
     "profiles.x.image: no file"),
    ("[qemu]\nsupervision = 'cron'\n", "qemu.supervision: one of auto, direct, systemd"),
    ("[qemu]\nbinary = 'qemu; rm -rf /'\n", "qemu.binary: a command name or path"),
    ("[limits]\nvcpus = [4, 2]\n", "limits.vcpus: must be [LOW, HIGH]"),
    ("[profiles\n", "not TOML"),
    ("[extra]\n", "unknown table 'extra'"),
])
def test_a_profiles_file_with_bad_values_is_a_clear_error_and_no_dead_node(
        node: Node, text: str, needle: str) -> None:
    (node.state / "vm-profiles.toml").write_text(text)
    size = audit.verify(node.state / "ledger").records
    bad = node.vm("create", "--profile", "tiny", "--name", "p1", check=False)
    assert bad.returncode == 1 and f"vm-profiles.toml: {needle}" in bad.stderr, bad.stderr
    assert audit.verify(node.state / "ledger").records == size
    assert "vm-profiles.toml" in json.loads(node.vm("pool", "--json").stdout)["host_error"]
    (node.state / "vm-profiles.toml").unlink()
    assert "vm p1 (tiny): defined" in node.vm("create", "--profile", "tiny", "--name",
                                              "p1").stdout
    assert json.loads(node.vm("pool", "--json").stdout)["host_error"] is None


def test_revoking_the_admins_vm_capability_stops_the_commands_naming_it(node: Node) -> None:
    node.vm("create", "--profile", "tiny", "--name", "c1")
    caps = json.loads(ppn("caps", "list", "--state-dir", node.state, "--pd",
                          "pd-network-admin", "--json").stdout)
    control = next(c for c in caps if c["object"] == "vm.control")
    query = next(c for c in caps if c["object"] == "vm.query")
    # seL4's revoke: the derived caps of the one named go (pd-network-admin's is derived
    # from pd-vmm's own on vm.control).
    assert control["parent"] is not None and query["parent"] is not None
    ppn("caps", "revoke", "--state-dir", node.state, str(control["parent"]))
    no = node.vm("start", "c1", check=False)
    assert no.returncode == 1 and f"capability #{control['cap']} on vm.control" in no.stderr, \
        no.stderr
    assert node.qemus("c1") == [] and node.list()["c1"]["state"] == "defined"
    assert node.list()["c1"]["state"] == "defined"  # vm.query still held: list works
    ppn("caps", "revoke", "--state-dir", node.state, str(query["parent"]))
    no = node.vm("list", check=False)
    assert no.returncode == 1 and f"capability #{query['cap']} on vm.query" in no.stderr, \
        no.stderr
