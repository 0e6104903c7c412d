"""The auditor's commands, run as a real `ppn` process against a real state directory."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.keys import NodeKeys
from ledger.scan import LogReader

INIT_OUTPUT: list[str] = []


def ppn(*args: str | Path, check: bool = True, stdin: bytes | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)],
                          capture_output=True, input=stdin, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ppn {args} failed: {proc.stderr.decode()}")
    return proc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("node") / "state"
    out = ppn("node", "init", "--state-dir", state, "--name", "laptop-b", "--role", "hub",
              "--mesh-ip", "10.8.0.1").stdout.decode()
    assert f"ledger directory: {state / 'ledger'}" in out
    INIT_OUTPUT.append(out)  # kept for the secrets check
    return state


def test_init_records_identity_pds_and_grants(node: Path) -> None:
    entries = list(LogReader(node / "ledger").entries())
    tags = [type(e.event).__name__ for e in entries]
    assert tags[:3] == ["LedgerGenesis", "NodeIdentity", "MemberAdded"]
    assert tags.count("PdDeclared") == 7
    grants = [e for e in entries if type(e.event).__name__ == "CapGranted"]
    assert {g.event.holder for g in grants} == {
        "pd-genesis", "pd-ledger", "pd-wireguard", "pd-net-driver", "pd-vmm", "pd-fleet",
        "pd-network-admin"}
    assert all(g.signature is not None for g in grants)
    keys = NodeKeys.load(node)
    assert entries[1].event.wg_public_key == keys.wg_public_key
    for name in ("node.key", "wireguard.key"):
        assert (node / name).stat().st_mode & 0o777 == 0o600
    assert not (node / "ledger" / "node.key").exists()


def test_verify_ok_then_names_the_failure(node: Path, tmp_path: Path) -> None:
    out = ppn("ledger", "verify", node / "ledger").stdout.decode()
    assert out.startswith("ok: 45 records") and "1 members" in out
    pub = ppn("ledger", "pubkey", node / "ledger").stdout.decode().strip()
    assert pub in out and pub.startswith("laptop-b.ppn/ledger+")
    assert ppn("ledger", "verify", node / "ledger", "--key", pub).returncode == 0
    one = ppn("ledger", "verify", node / "ledger", "--jobs", "1").stdout.decode()
    assert one.split("; ")[:2] == out.split("; ")[:2]  # same records, members and root
    assert ppn("ledger", "verify", node / "ledger", "--jobs", "0", check=False).returncode == 2
    other = NodeKeys.generate()
    from ledger.note import verifier_key
    pinned = ppn("ledger", "verify", node / "ledger", "--key",
                 verifier_key("laptop-b.ppn/ledger", other.public_key), check=False)
    assert pinned.returncode == 1 and b"different key" in pinned.stdout
    # Damage one byte of a copy, mid-log.
    copy = tmp_path / "ledger"
    subprocess.run(["cp", "-r", str(node / "ledger"), str(copy)], check=True)
    seg = copy / "seg-00000000000000000000.log"
    os.chmod(seg, 0o644)
    data = bytearray(seg.read_bytes())
    data[200] ^= 1
    seg.write_bytes(bytes(data))
    bad = ppn("ledger", "verify", copy, check=False)
    assert bad.returncode == 1
    line = bad.stdout.decode()
    assert line.startswith("FAILED: seg-00000000000000000000.log offset ")
    assert "(seq " in line and "checksum" in line


def test_show_filters_and_json(node: Path) -> None:
    text = ppn("ledger", "show", node / "ledger").stdout.decode().splitlines()
    assert len(text) == 45 and text[0].split()[0] == "0" and "ledger.genesis" in text[0]
    caps = ppn("ledger", "show", node / "ledger", "--type", "cap", "--json").stdout
    rows = [json.loads(line) for line in caps.splitlines()]
    assert rows and all(r["type"] == "cap.granted" and r["signature"] for r in rows)
    assert rows[0]["event"]["rights"] == ["read", "write", "grant", "grant-reply"]
    window = ppn("ledger", "show", node / "ledger", "--from", "3", "--to", "5").stdout
    assert [int(line.split()[0]) for line in window.decode().splitlines()] == [3, 4, 5]


def test_state_at_and_json(node: Path) -> None:
    early = json.loads(ppn("ledger", "state", node / "ledger", "--at", "2", "--json").stdout)
    assert early["seq"] == 2 and early["pds"] == {} and len(early["members"]) == 1
    full = json.loads(ppn("ledger", "state", node / "ledger", "--json").stdout)
    assert len(full["pds"]) == 7 and len(full["caps"]) == 32
    text = ppn("ledger", "state", node / "ledger").stdout.decode()
    assert "laptop-b" in text and "pd-fleet" in text
    missing = ppn("ledger", "state", node / "ledger", "--at", "999", check=False)
    assert missing.returncode == 1 and b"no record 999" in missing.stderr


def test_checkpoint_is_byte_exact(node: Path) -> None:
    note = ppn("ledger", "checkpoint", node / "ledger").stdout
    seg = (node / "ledger" / "seg-00000000000000000000.log").read_bytes()
    assert seg.endswith(note)
    lines = note.decode().split("\n")
    assert lines[0] == "laptop-b.ppn/ledger" and lines[1] == "45"
    assert lines[4].startswith("\u2014 laptop-b.ppn/ledger ")
    first = ppn("ledger", "checkpoint", node / "ledger", "--size", "1").stdout
    assert first.split(b"\n")[1] == b"1"
    assert ppn("ledger", "checkpoint", node / "ledger", "--size", "7", check=False).returncode == 1


def test_prove_and_check_proof(node: Path, tmp_path: Path) -> None:
    d = node / "ledger"
    key = ppn("ledger", "pubkey", d).stdout.decode().strip()
    (tmp_path / "new.note").write_bytes(ppn("ledger", "checkpoint", d).stdout)
    (tmp_path / "old.note").write_bytes(ppn("ledger", "checkpoint", d, "--size", "1").stdout)
    incl = json.loads(ppn("ledger", "prove", d, "12").stdout)
    assert incl["leaf_index"] == 12 and incl["tree_size"] == 45 and incl["proof"]
    (tmp_path / "incl.json").write_text(json.dumps(incl))
    ok = ppn("ledger", "check-proof", tmp_path / "incl.json", "--checkpoint",
             tmp_path / "new.note", "--key", key)
    assert ok.stdout.decode().startswith("ok: record 12 is in tree 45")
    cons = json.loads(ppn("ledger", "prove", d, "--consistency", "1", "45").stdout)
    (tmp_path / "cons.json").write_text(json.dumps(cons))
    ok = ppn("ledger", "check-proof", tmp_path / "cons.json", "--checkpoint",
             tmp_path / "new.note", "--old-checkpoint", tmp_path / "old.note", "--key", key)
    assert ok.stdout.decode().startswith("ok: tree 1 is a prefix of tree 45")
    # A forged proof, a tampered record, a wrong key: each a clean error, exit 1.
    incl["proof"][0] = "00" * 32
    (tmp_path / "bad.json").write_text(json.dumps(incl))
    bad = ppn("ledger", "check-proof", tmp_path / "bad.json", "--checkpoint",
              tmp_path / "new.note", "--key", key, check=False)
    assert bad.returncode == 1 and b"does not match" in bad.stderr
    incl = json.loads(ppn("ledger", "prove", d, "12").stdout)
    last = int(incl["record"][-2:], 16) ^ 0x01  # change the record's last byte, whatever it is
    incl["record"] = incl["record"][:-2] + f"{last:02x}"
    (tmp_path / "bad.json").write_text(json.dumps(incl))
    bad = ppn("ledger", "check-proof", tmp_path / "bad.json", "--checkpoint",
              tmp_path / "new.note", "--key", key, check=False)
    assert bad.returncode == 1 and b"does not hash" in bad.stderr
    from ledger.note import verifier_key
    wrong = verifier_key("laptop-b.ppn/ledger", NodeKeys.generate().public_key)
    bad = ppn("ledger", "check-proof", tmp_path / "incl.json", "--checkpoint",
              tmp_path / "new.note", "--key", wrong, check=False)
    assert bad.returncode == 1 and b"Traceback" not in bad.stderr
    junk = ppn("ledger", "check-proof", "-", "--checkpoint", tmp_path / "new.note",
               "--key", key, check=False, stdin=b"{not json")
    assert junk.returncode == 1 and b"not a JSON proof" in junk.stderr


def test_bad_input_is_a_clean_error(node: Path, tmp_path: Path) -> None:
    again = ppn("node", "init", "--state-dir", node, "--name", "x", check=False)
    assert again.returncode == 1 and b"already has a node" in again.stderr
    for args, code in ((["--name", "Bad Name!"], 1),
                       (["--name", "ok", "--mesh-ip", "192.168.1.1"], 2)):  # a usage error
        r = ppn("node", "init", "--state-dir", tmp_path / "s", *args, check=False)
        assert r.returncode == code and b"Traceback" not in r.stderr
    r = ppn("ledger", "verify", tmp_path, check=False)
    assert r.returncode == 1 and b"not a ledger" in r.stdout


def test_secrets_appear_nowhere(node: Path) -> None:
    seed_b64 = (node / "node.key").read_text().split()[1]
    wg_b64 = (node / "wireguard.key").read_text().strip()
    secrets = [seed_b64.encode(), wg_b64.encode(), base64.b64decode(seed_b64),
               base64.b64decode(wg_b64), base64.b64decode(seed_b64).hex().encode()]
    blobs = [p.read_bytes() for p in (node / "ledger").rglob("*") if p.is_file()]
    d = node / "ledger"
    for args in (["show", d, "--json"], ["state", d, "--json"], ["verify", d],
                 ["checkpoint", d], ["prove", d, "3"]):
        proc = ppn("ledger", *args)
        blobs += [proc.stdout, proc.stderr]
    blobs += [out.encode() for out in INIT_OUTPUT]
    for blob in blobs:
        for secret in secrets:
            assert secret not in blob
