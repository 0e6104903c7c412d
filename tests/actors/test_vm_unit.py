"""The pieces of pd-vmm's real side that need no running guest: the shipped profiles, the
accelerator table, the QEMU command line, and the ``ppn-vm@.service`` template (checked
with ``systemd-analyze verify`` where that tool exists)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors import vm_config
from actors.io import qemu
from ledger.vms import ACCELS

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_ESCAPE = shutil.which("systemd-escape")


def test_the_shipped_profiles_are_the_seed_vm_types_within_limits() -> None:
    config = vm_config.load()
    profiles = config["profiles"]
    assert {"mediakit", "totebox", "orchestration", "privategit"} <= set(profiles)
    for p in profiles.values():
        lo, hi = config["limits"]["vcpus"]
        assert lo <= p["vcpus"] <= hi and p["image"] is None  # disk-less as shipped
    assert config["qemu"]["supervision"] == "auto"


def test_a_node_file_replaces_profiles_and_keys_and_resolves_images(tmp_path: Path) -> None:
    (tmp_path / "base.qcow2").write_bytes(b"QFI\xfb")
    (tmp_path / vm_config.NODE_FILE).write_text(
        '[qemu]\nmachine = "q35"\n[profiles.totebox]\nvcpus = 3\nram_mib = 512\n'
        'image = "base.qcow2"\n')
    config = vm_config.load(tmp_path)
    assert config["profiles"]["totebox"] == {"vcpus": 3, "ram_mib": 512,
                                             "image": str(tmp_path / "base.qcow2")}
    assert config["profiles"]["mediakit"]["vcpus"] == 2  # the shipped ones stay
    assert config["qemu"]["machine"] == "q35" and config["qemu"]["binary"] == \
        "qemu-system-x86_64"


def test_the_accelerators_are_the_ledgers_and_tcg_always_works() -> None:
    assert tuple(qemu.ACCELERATORS) == ACCELS  # best first, the same names
    assert qemu.ACCELERATORS["tcg"].available()
    assert qemu.kvm_works("/nonexistent/kvm") is False
    assert qemu.kvm_works("/dev/null") is False  # opens, but is not KVM


def test_the_command_line_has_both_qmp_sockets_the_balloon_and_the_overlay() -> None:
    q = vm_config.load()["qemu"]
    argv = qemu.qemu_argv(q, "tb-1", 2, 1024, "tcg", "/s/vms/tb-1.qmp",
                          "/s/vms/tb-1.audit.qmp", "/s/vms/tb-1.qcow2")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64" and "-accel tcg,tb-size=32" in joined
    assert "-smp 2 -m 1024" in joined and "-nodefaults" in argv
    assert "-qmp unix:/s/vms/tb-1.qmp,server=on,wait=off" in joined
    assert "-qmp unix:/s/vms/tb-1.audit.qmp,server=on,wait=off" in joined
    assert "virtio-balloon-pci,id=balloon0" in argv
    assert "file=/s/vms/tb-1.qcow2,if=virtio,format=qcow2" in argv
    kvm = qemu.qemu_argv(q, "x", 1, 32, "kvm", "/a.qmp", "/b.qmp", None)
    assert kvm[kvm.index("-accel") + 1] == "kvm" and "-drive" not in kvm


@pytest.mark.parametrize("path", ["/var/lib/ppn/vms/totebox-1", "/tmp/a b/vms/x.y",
                                  "/srv/.hidden/vms/m-2", "/tmp/ünï/vms/g"])
def test_unit_instance_names_are_systemd_escapes(path: str) -> None:
    if SYSTEMD_ESCAPE is None:
        pytest.skip("no systemd-escape here")
    want = subprocess.run([SYSTEMD_ESCAPE, "--path", path], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert qemu.unit_instance(Path(path)) == want


@pytest.mark.real
def test_the_unit_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("no systemd-analyze here")
    units = tmp_path / "units"
    units.mkdir()
    guest = tmp_path / "vms" / "totebox-1"
    guest.parent.mkdir()
    guest.with_suffix(".env").write_text("PPN_QEMU=qemu-system-x86_64\nPPN_QEMU_ARGS=-m 32\n")
    instance = units / f"ppn-vm@{qemu.unit_instance(guest)}.service"
    shutil.copy(qemu.UNIT_TEMPLATE, instance)
    ok = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(instance)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    text = qemu.UNIT_TEMPLATE.read_text()
    assert "EnvironmentFile=/%I.env" in text and "Restart=no" in text
    # The check can fail: the same unit without its ExecStart is refused.
    broken = units / "ppn-vm@broken.service"
    broken.write_text("\n".join(line for line in text.splitlines()
                                if not line.startswith("ExecStart=")) + "\n")
    bad = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(broken)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "ExecStart" in bad.stderr


def test_ppn_vm_loads_nothing_of_the_nodes_runtime(tmp_path: Path) -> None:
    """``ppn vm`` (actors.entry) answers without the kernel, pyroute2, structlog, the event
    catalog or asyncio: a script calling it in a loop pays ~50 ms a call, not ~400."""
    probe = (
        "import sys\n"
        "sys.argv = ['ppn', 'vm', 'pool', '--state-dir', sys.argv[1]]\n"
        "from actors import entry\n"
        "code = entry.main()\n"
        "heavy = ('structlog', 'pyroute2', 'asyncio', 'qemu', 'actors.runtime',\n"
        "         'actors.kernel', 'ledger.catalog', 'nacl', 'msgpack', 'pykka')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert out.stdout.split(None, 1) == ["1", "[]\n"], (out.stdout, out.stderr)
    assert out.stderr.startswith("ppn: error: the node is not running")


def test_the_units_environment_file_gives_back_the_direct_command_line() -> None:
    """What systemd runs (``env ${PPN_QEMU} $PPN_QEMU_ARGS``, the second split at
    whitespace) is the command line direct supervision runs; one that would not split
    back the same is refused."""
    q = vm_config.load()["qemu"]
    argv = qemu.qemu_argv(q, "tb-1", 2, 1024, "tcg", "/var/lib/ppn/vms/tb-1.qmp",
                          "/var/lib/ppn/vms/tb-1.audit.qmp", "/var/lib/ppn/vms/tb-1.qcow2")
    env = dict(line.split("=", 1) for line in qemu.systemd_env(argv).splitlines())
    assert set(env) == {"PPN_QEMU", "PPN_QEMU_ARGS"}
    assert [env["PPN_QEMU"], *env["PPN_QEMU_ARGS"].split()] == argv
    spaced = qemu.qemu_argv(q, "x", 1, 32, "tcg", "/tmp/a b/x.qmp", "/tmp/a b/y.qmp", None)
    with pytest.raises(RuntimeError, match="spaces or quotes"):
        qemu.systemd_env(spaced)
