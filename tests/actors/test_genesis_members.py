"""A mesh grown only by the Genesis ceremony, for real (namespaces ``ppn11m*``): laptop-b
founds it and admits laptop-a and cloud; then laptop-e joins, and every member's
nodes.jsonl says so within seconds (signed announcements over the tunnels); then it is
removed, and within 5 s no member has its key and it reaches no one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.mesh_demo import NODES, DemoMesh, missing

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(missing() is not None, reason=str(missing()))]
NEW, UNDER = "laptop-e", "192.0.2.5"


def ppn(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"ppn {args}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoMesh]:
    with DemoMesh(tmp_path_factory.mktemp("members"), prefix="ppn11m", by_ceremony=True) as m:
        yield m


def until(cond, timeout: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "not in time"
        time.sleep(0.05)
    return time.monotonic() - t0


def jsonl(mesh: DemoMesh, name: str) -> bytes:
    return (mesh.states[name] / "ledger" / "nodes.jsonl").read_bytes()


def wg_keys(mesh: DemoMesh, name: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", mesh.ns(name), "wg", "show",
                          mesh.iface(name), "dump"], capture_output=True, text=True).stdout
    return {line.split("\t")[0] for line in out.splitlines()[1:]}


def test_the_founders_members_know_each_other(mesh: DemoMesh) -> None:
    files = {name: jsonl(mesh, name) for name in NODES}
    assert len(set(files.values())) == 1
    names = [json.loads(line)["name"] for line in files["laptop-b"].decode().splitlines()]
    assert names == ["cloud", "laptop-a", "laptop-b"]
    until(lambda: mesh.ping("laptop-a", "10.8.0.3") is not None, 30)  # spoke to spoke


def test_a_new_member_reaches_every_ledger_and_a_removal_every_device(
        mesh: DemoMesh) -> None:
    state = mesh.add_waiting_node(NEW, UNDER)
    mesh.pair(NEW, "laptop-b", f"{UNDER}:7000")
    key = json.loads(ppn("node", "identity", "--state-dir", state, "--json").stdout)[
        "wg_public_key"]
    learned = until(lambda: len({jsonl(mesh, n) for n in [*NODES, NEW]}) == 1, 5)
    print(f"every member's nodes.jsonl has {NEW}: {learned:.2f} s after the ceremony")
    assert key in wg_keys(mesh, "laptop-b")  # the hub rule: the hub peers with it
    for _, ip, _ in NODES.values():
        until(lambda ip=ip: mesh.ping(NEW, ip) is not None, 30)
    listing = ppn("mesh", "member", "list", "--state-dir", mesh.states["laptop-a"]).stdout
    assert f"{NEW}" in listing and "approved by laptop-b" in listing
    assert "recorded" in listing

    ppn("mesh", "member", "remove", "--state-dir", mesh.states["laptop-b"], NEW)
    gone = until(lambda: all(key not in wg_keys(mesh, n) for n in NODES), 5)
    print(f"no member's device has {NEW}'s key: {gone:.2f} s after the removal")
    until(lambda: all(NEW.encode() not in jsonl(mesh, n) for n in NODES), 5)
    for _, ip, _ in NODES.values():
        assert mesh.ping(NEW, ip, timeout=1) is None
    for name in NODES:
        assert subprocess.run([sys.executable, "-m", "actors.cli", "ledger", "verify",
                               str(mesh.states[name] / "ledger")], cwd=ROOT,
                              capture_output=True).returncode == 0
