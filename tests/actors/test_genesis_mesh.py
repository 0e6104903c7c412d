"""The Genesis ceremony for real: the three-node WireGuard mesh (namespaces ``ppn11g*``) and
a fourth node, waiting to be joined, paired through ``ppn pair`` / ``ppn pair approve`` over
TCP on the underlay.  Everything is removed afterwards, also on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.mesh_demo import DemoMesh, missing
from actors.pds.genesis_proto import new_code
from ledger import audit
from ledger.catalog import CapGranted

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(missing() is not None, reason=str(missing()))]
NEW, UNDER = "laptop-e", "192.0.2.5"
LISTEN = f"{UNDER}:7000"


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoMesh]:
    with DemoMesh(tmp_path_factory.mktemp("genesis"), prefix="ppn11g") as m:
        m.add_waiting_node(NEW, UNDER)
        yield m


def wait(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.1)


def test_a_fourth_node_joins_through_the_ceremony_and_reaches_every_member(
        mesh: DemoMesh) -> None:
    new = mesh.states[NEW]
    status = json.loads(ppn("mesh", "status", "--state-dir", new, "--json").stdout)
    assert "waiting to be joined" in (status.get("held_back") or "")
    code, joiner_out, approver_out = mesh.pair(NEW, "laptop-b", LISTEN)
    assert f"pairing code: {code}" in joiner_out and "paired with laptop-b" in joiner_out
    assert f"paired: {NEW} is a member now, at 10.8.0.4" in approver_out
    ident = json.loads(ppn("node", "identity", "--state-dir", new, "--json").stdout)
    assert ident["mesh_ip"] == "10.8.0.4"
    # Its tunnel to the hub comes up, and through the hub it reaches every node.
    for ip in ("10.8.0.1", "10.8.0.2", "10.8.0.3"):
        wait(lambda ip=ip: mesh.ping(NEW, ip) is not None)
    assert ident["wg_public_key"] in {
        line.split("\t")[0] for line in subprocess.run(
            ["ip", "netns", "exec", mesh.ns("laptop-b"), "wg", "show", mesh.iface("laptop-b"),
             "dump"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]}
    hub, joined = mesh.states["laptop-b"], new
    assert (hub / "ledger" / "nodes.jsonl").read_bytes() == \
        (joined / "ledger" / "nodes.jsonl").read_bytes()
    for state in (hub, joined):
        assert ppn("ledger", "verify", state / "ledger").returncode == 0
        # pd-genesis is reaped on both sides, and what it held is refused from now on.
        st = json.loads(ppn("node", "status", "--state-dir", state, "--json").stdout)
        assert st["pds"]["pd-genesis"]["status"] == "reaped"
        assert not st["pds"]["pd-genesis"]["alive"]
        assert json.loads(ppn("caps", "list", "--state-dir", state, "--pd", "pd-genesis",
                              "--json").stdout) == []
        former = [e.event.cap_id for e in audit.entries(state / "ledger")
                  if type(e.event) is CapGranted and e.event.holder == "pd-genesis"]
        assert former
        for cap in former:
            no = ppn("node", "ping", "--state-dir", state, "--cap", str(cap), check=False)
            assert no.returncode == 1 and "no such capability" in no.stderr, no.stderr
    # The code is nowhere: ledgers, node logs, the approver's output.
    for state in (hub, joined):
        blob = b"".join(p.read_bytes() for p in (state / "ledger").iterdir() if p.is_file())
        for form in (code, code.replace("-", "")):
            assert form.encode() not in blob
    for log in mesh.directory.glob("*.log"):
        text = log.read_text(errors="replace")
        assert code not in text and code.replace("-", "") not in text
    assert code not in approver_out


def test_a_wrong_code_adds_nothing_and_says_so_on_both_sides(mesh: DemoMesh) -> None:
    other = mesh.add_waiting_node("laptop-f", "192.0.2.6")
    joiner = subprocess.Popen([sys.executable, "-m", "actors.cli", "pair", "--state-dir",
                               str(other), "--listen", "192.0.2.6:7000"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert joiner.stdout is not None
    code = joiner.stdout.readline().split(": ", 1)[1].strip()
    wrong = new_code(os.urandom)
    no = subprocess.run([sys.executable, "-m", "actors.cli", "pair", "approve", "--state-dir",
                         str(mesh.states["laptop-b"]), "--code", "-", "--peer",
                         "192.0.2.6:7000"], input=wrong + "\n", capture_output=True,
                        text=True, timeout=60, cwd=ROOT)
    _, err = joiner.communicate(timeout=60)
    assert no.returncode == 1 and "code mismatch" in no.stderr and "Traceback" not in no.stderr
    assert joiner.returncode == 1 and "code mismatch" in err
    members = [json.loads(line)["name"] for line in
               (mesh.states["laptop-b"] / "ledger" / "nodes.jsonl").read_text().splitlines()]
    assert "laptop-f" not in members
    again = subprocess.run([sys.executable, "-m", "actors.cli", "pair", "approve",
                            "--state-dir", str(mesh.states["laptop-b"]), "--code", "-",
                            "--peer", "192.0.2.6:7000"], input=code + "\n",
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 1 and "cannot connect" in again.stderr  # the code is dead
