"""Attacks on pd-vmm under real QEMU: hostile files in the node's directory, hostile or
stuck "QEMU" binaries and QMP peers, and what an operator's terminal is shown.

Each test says in its docstring what it found broken before the fix.  Guests are tiny,
disk-less and run under TCG (``--vm-accel tcg``); a fake QEMU is a small Python QMP
server set as the node's ``[qemu] binary``.  Everything a test starts is killed at its
end, even on failure (processes found by the test's own directory, prefix ``ppn10x``).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.io import qemu as qemu_io
from actors.pds.base import IoFailure, IoResult
from actors.pds.pd_vmm import LaunchVm, LoadHost
from tests.actors.test_vm_real import (
    QEMU,
    Node,
    kill_all_with,
    ppn,
    processes_with,
    qmp,
    wait_for,
)

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(QEMU is None or shutil.which("qemu-img") is None,
                                 reason="needs qemu-system-x86_64 and qemu-img")]

FAKE = r'''#!{python}
"""A fake QEMU: a QMP server on every -qmp socket it is given, behaving as MODE says."""
import json, os, socket, sys, threading, time
MODE = "{mode}"
GREETING = (b'{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 2, "major": 7}}, '
            b'"package": ""}}, "capabilities": []}}}}\r\n')

def messages(c):
    buf, dec = "", json.JSONDecoder()
    while True:
        data = c.recv(65536)
        if not data:
            return
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg

def serve(c):
    if MODE == "slow":
        time.sleep(2.5)  # a slow greeting...
    c.sendall(GREETING)
    for msg in messages(c):
        ex, i = msg.get("execute"), msg.get("id")
        if ex != "qmp_capabilities" and MODE == "slow":
            continue  # ...and then no answer at all
        ret = {{"status": "running", "running": True}} if ex == "query-status" else {{}}
        c.sendall(json.dumps({{"return": ret, "id": i}}).encode() + b"\r\n")

def listen(arg):
    s = socket.socket(socket.AF_UNIX)
    s.bind(arg[5:].split(",server=")[0].replace(",,", ","))
    s.listen(4)
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()

for a in sys.argv:
    if a.startswith("unix:"):
        threading.Thread(target=listen, args=(a,), daemon=True).start()
while True:
    time.sleep(1)
'''


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ppn10x", dir="/tmp"))
    try:
        yield base
    finally:
        kill_all_with(str(base))
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def node(scratch: Path) -> Iterator[Node]:
    n = Node(scratch, "--vm-accel", "tcg", "--vm-vcpus", "16")
    try:
        n.run()
        yield n
    finally:
        n.close()


def fake_qemu(where: Path, mode: str) -> Path:
    fake = where / f"fake-qemu-{mode}"
    fake.write_text(FAKE.format(python=sys.executable, mode=mode))
    fake.chmod(0o755)
    return fake


def test_a_pause_seen_only_on_qmp_is_recorded(node: Node) -> None:
    """Found: the adapter dropped every QMP event (qemu.qmp's ``Message`` is a Mapping,
    not a dict), so a guest paused or resumed through another QMP connection stayed
    "running" in the ledger: QMP was not the truth."""
    node.vm("create", "--profile", "tiny", "--name", "q1", "--start")
    audit_sock = node.list()["q1"]["audit_qmp"]
    qmp(audit_sock, "stop")
    wait_for(lambda: node.list()["q1"]["state"] == "paused", 3.0, "paused seen on QMP")
    qmp(audit_sock, "cont")
    wait_for(lambda: node.list()["q1"]["state"] == "running", 3.0, "resumed seen on QMP")
    whys = [p["why"] for k, p in node.events() if k in ("vm.paused", "vm.resumed")]
    assert whys == ["QMP STOP", "QMP RESUME"]


def test_planted_links_in_vms_write_nothing_outside_it(node: Node, scratch: Path) -> None:
    """Found: QEMU's log ``vms/NAME.log`` was opened (and chmod-ed) through whatever was
    there: a link planted to a file outside had that file truncated, overwritten with
    QEMU's output and made 0600.  Links planted for the sockets and the overlay are only
    ever unlinked, or refused."""
    victim = scratch / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (node.vms / "l2.qmp").symlink_to(victim)  # refused, clearly: nothing started
    bad = node.vm("create", "--profile", "tiny", "--name", "l2", "--start", check=False)
    assert bad.returncode == 1 and "l2.qmp: not a file of" in bad.stderr, bad.stderr
    (node.vms / "l2.qmp").unlink()
    for suffix in (".log", ".audit.qmp"):
        (node.vms / f"l1{suffix}").symlink_to(victim)
    node.vm("create", "--profile", "tiny", "--name", "l1", "--start")
    assert qmp(node.list()["l1"]["audit_qmp"])["status"] == "running"
    node.vm("destroy", "l1")
    node.vm("destroy", "l2")
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    assert list(node.vms.iterdir()) == []


def test_a_vms_dir_that_is_a_link_is_refused(node: Node, scratch: Path) -> None:
    """Found: ``vms/`` replaced by a link to another directory was followed: that
    directory was chmod-ed 0700 and the guests' sockets and logs were made there (and
    "inside vms/" checks passed for files anywhere it pointed)."""
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    node.vms.rmdir()
    node.vms.symlink_to(elsewhere)
    bad = node.vm("create", "--profile", "tiny", "--name", "v1", "--start", check=False)
    assert bad.returncode == 1 and "not a directory (a link" in bad.stderr, bad.stderr
    assert list(elsewhere.iterdir()) == [] and elsewhere.stat().st_mode & 0o777 == 0o755
    assert node.qemus("v1") == [] and processes_with(str(elsewhere)) == []


def test_a_fifo_as_the_profiles_file_does_not_hang_the_node(node: Node) -> None:
    """Found: a FIFO at ``DIR/vm-profiles.toml`` blocked the adapter's one asyncio thread
    in ``open()`` forever: every vm command of the node hung (and QEMU exits were no
    longer seen) until the node was restarted."""
    os.mkfifo(node.state / "vm-profiles.toml")
    t0 = time.monotonic()
    bad = ppn("vm", "create", "--state-dir", node.state, "--profile", "tiny", "--name",
              "f1", check=False, timeout=15)
    assert bad.returncode == 1 and "vm-profiles.toml: not a regular file" in bad.stderr, \
        bad.stderr
    assert time.monotonic() - t0 < 10
    (node.state / "vm-profiles.toml").unlink()
    (node.state / "vm-profiles.toml").mkdir()  # a directory: the same clear error
    assert "not a regular file" in node.vm("create", "--profile", "tiny", "--name", "f1",
                                           check=False).stderr
    (node.state / "vm-profiles.toml").rmdir()
    assert "defined" in node.vm("create", "--profile", "tiny", "--name", "f1").stdout


def test_an_unanswering_qemu_found_at_restart_is_killed_not_started_twice(
        node: Node) -> None:
    """Found: after a node restart, a guest whose QEMU still ran but did not answer QMP
    (here: SIGSTOPped) was recorded lost and left running; ``vm start`` then unlinked its
    sockets and started a second QEMU for the same guest."""
    node.vm("create", "--profile", "tiny", "--name", "s1", "--start")
    pid = node.list()["s1"]["pid"]
    node.kill9()
    os.kill(pid, signal.SIGSTOP)
    try:
        node.run()
        wait_for(lambda: node.list()["s1"]["state"] == "lost", 20.0, "lost")
        wait_for(lambda: node.qemus("s1") == [], 5.0, "the stuck QEMU gone")
        lost = [p["reason"] for k, p in node.events() if k == "vm.lost"]
        assert len(lost) == 1 and "did not answer on QMP" in lost[0], lost
        assert ": running," in node.vm("start", "s1").stdout
        assert len(node.qemus("s1")) == 1
    finally:
        with _suppress():
            os.kill(pid, signal.SIGCONT)


def test_a_state_dir_with_a_comma_adds_no_qemu_options() -> None:
    """Found: the state directory's path went into ``-qmp unix:PATH,server=on`` (and
    ``-drive file=PATH,...``) as it was: a comma in it started options of its own
    (``/tmp/x,a=b`` -> QEMU: "Invalid parameter 'a'"; worse ones are possible)."""
    base = Path(tempfile.mkdtemp(prefix="ppn10x,a=b", dir="/tmp"))
    needle = base.name.split(",")[-1]  # QEMU's command line has the comma doubled
    n = Node(base, "--vm-accel", "tcg", "--vm-vcpus", "4")
    try:
        n.run()
        n.vm("create", "--profile", "tiny", "--name", "c1", "--start")
        g = n.list()["c1"]
        assert qmp(g["audit_qmp"])["status"] == "running"
        n.kill9()  # and it is recognised as the guest's QEMU again after a restart
        n.run()
        assert n.list()["c1"]["state"] == "running" and n.list()["c1"]["pid"] == g["pid"]
        n.vm("destroy", "c1")
        assert processes_with(needle) == [p for p in processes_with(needle)
                                          if p == n.proc.pid]  # type: ignore[union-attr]
    finally:
        n.close()
        kill_all_with(needle)
        shutil.rmtree(base, ignore_errors=True)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def test_a_slow_qmp_peer_cannot_stretch_a_launch_past_its_bound(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: START_TIMEOUT bounded only the greeting; the launch's ``query-status`` and
    ``query-balloon`` then had COMMAND_TIMEOUT each, so a QMP peer that greets late and
    answers nothing held a launch for START_TIMEOUT + 2 x COMMAND_TIMEOUT (50 s: longer
    than the node's own 40 s bound, so a start could be recorded after its caller was
    told it failed).  Driven in-process with the bounds scaled down."""
    monkeypatch.setattr(qemu_io, "START_TIMEOUT", 3.0)
    monkeypatch.setattr(qemu_io, "COMMAND_TIMEOUT", 2.0)
    state = scratch / "n"
    state.mkdir()
    fake = fake_qemu(scratch, "slow")
    (state / "vm-profiles.toml").write_text(f'[qemu]\nbinary = "{fake}"\n'
                                            'supervision = "direct"\n')
    adapter = qemu_io.QemuAdapter(state)
    try:
        def ask(request: Any, timeout: float) -> Any:
            got: list[Any] = []
            done = threading.Event()
            def answer(a: Any) -> None:
                got.append(a)
                done.set()
            adapter.submit(request, answer)
            assert done.wait(timeout), f"{type(request).__name__}: no answer"
            return got[0]
        host = ask(LoadHost(1), 10)
        assert isinstance(host, IoResult), host
        t0 = time.monotonic()
        out = ask(LaunchVm(2, "w1", 1, 32, "tcg", str(state / "vms" / "w1.qmp"), None), 20)
        took = time.monotonic() - t0
        assert isinstance(out, IoFailure) and "query-status" in out.error, out
        assert took < 3.0 + 0.6, f"the launch took {took:.1f} s"  # was 4.5 s
        wait_for(lambda: processes_with(str(fake)) == [], 3.0, "the fake QEMU killed")
    finally:
        adapter.close()
