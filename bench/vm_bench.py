"""pd-vmm's benchmarks (issue 10), each beside plain QEMU measured in the same run.

Run as root with qemu-system-x86_64: ``.venv/bin/python bench/vm_bench.py`` (about two
minutes; ``--guests N`` for fewer than 128, ``--rounds R``).  Guests are tiny and
disk-less and run under **TCG** on both sides (a disk-less guest's firmware takes
~0.3 s of CPU under TCG against ~3.6 s under KVM here, and 128 of them share 2 cores).
State lives under a temp dir with the prefix ``ppn10b``; every process is killed and
the dir removed afterwards, also on failure.

1. Start to running: ``ppn vm create --start`` until ``query-status`` on the guest's
   audit socket says running, against the same QEMU command line launched directly
   and polled the same way (and, to show what the CLI's own start costs, the same
   create sent on the control socket from this process).  Goal <= 1.2x.
2. 128 guests x 2 vCPUs on one node (the seed's Phase 2 density): time to start them
   all (six creates in flight: the control socket serves eight clients) against 128
   plain QEMUs launched the same way; ``vm.list`` and ``vm.pool`` round trips (operator
   -> pd-network-admin -> pd-vmm under vm.query, through the kernel) p50/p99 while all
   run; the node's own RSS per managed guest.  Goals: all 128 running; node RSS under
   48 MB + 0.25 MB per guest.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu.qmp import QMPClient

from actors import control, vm_config
from actors.io.qemu import qemu_argv

ROOT = Path(__file__).resolve().parents[1]
PPN = [sys.executable, "-m", "actors.cli"]
PPN_SCRIPT = ROOT / ".venv" / "bin" / "ppn"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _status(path: str) -> str | None:
    client = QMPClient("bench")
    try:
        await asyncio.wait_for(client.connect(path), 2.0)
        return str((await client.execute("query-status"))["status"])
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def poll_running(path: str, timeout: float = 60.0) -> float:
    """Poll ``path`` (connect, ``query-status``) every 2 ms; the time it said running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and asyncio.run(_status(path)) == "running":
            return time.monotonic()
        time.sleep(0.002)
    raise RuntimeError(f"{path}: not running within {timeout} s")


def kill_with(needle: str) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


class BenchNode:
    def __init__(self, base: Path) -> None:
        self.state = base / "n"
        subprocess.run([*PPN, "node", "init", "--state-dir", str(self.state), "--name",
                        "bench", "--vm-accel", "tcg"], cwd=ROOT, check=True,
                       capture_output=True)
        self.log = (base / "node.log").open("ab")
        self.proc = subprocess.Popen([*PPN, "node", "run", "--state-dir", str(self.state),
                                      "--no-tunnel"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                control.request(self.state, {"cmd": "status"}, timeout=2)
                break
            except control.ControlError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the node did not come up") from None
                time.sleep(0.05)

    def ask(self, cmd: str, **fields: Any) -> Any:
        return control.request(self.state, {"cmd": cmd, **fields}, timeout=120)

    def audit(self, name: str) -> str:
        return str(self.state / "vms" / f"{name}.audit.qmp")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def direct(base: Path, name: str, vcpus: int, ram: int) -> tuple[subprocess.Popen[bytes], str]:
    q = vm_config.load()["qemu"]
    d = base / "direct"
    d.mkdir(exist_ok=True)
    qmp, audit = str(d / f"{name}.qmp"), str(d / f"{name}.audit.qmp")
    argv = qemu_argv(q, name, vcpus, ram, "tcg", qmp, audit, None)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, audit


def start_to_running(base: Path, node: BenchNode, rounds: int) -> None:
    cli = ([str(PPN_SCRIPT)] if PPN_SCRIPT.exists() else PPN)
    via_cli, via_socket, plain = [], [], []
    for i in range(rounds):
        name = f"s{i}"
        t0 = time.monotonic()
        proc = subprocess.Popen([*cli, "vm", "create", "--state-dir", str(node.state),
                                 "--profile", "tiny", "--name", name, "--start"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        via_cli.append(poll_running(node.audit(name)) - t0)
        _, err = proc.communicate(60)
        if proc.returncode != 0:
            raise RuntimeError(f"ppn vm create: {err.decode()[:300]}")
        node.ask("vm.destroy", name=name)

        name = f"c{i}"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            fut = pool.submit(node.ask, "vm.create", profile="tiny", name=name, start=True)
            via_socket.append(poll_running(node.audit(name)) - t0)
            fut.result(60)
        node.ask("vm.destroy", name=name)

        t0 = time.monotonic()
        qproc, audit = direct(base, f"d{i}", 1, 32)
        plain.append(poll_running(audit) - t0)
        qproc.kill()
        qproc.wait()
    a, s, p = (statistics.median(x) for x in (via_cli, via_socket, plain))
    print(f"\n1. start to running, tiny guest under TCG, median of {rounds}")
    print(f"   ppn vm create --start (CLI)      {a * 1000:7.1f} ms   {a / p:4.2f}x   goal <= 1.2x")
    print(f"   the same create on the socket     {s * 1000:7.1f} ms   {s / p:4.2f}x")
    print(f"   plain QEMU, same command line     {p * 1000:7.1f} ms   1.00x")
    print(f"   (all runs, ms: cli {[round(x * 1000) for x in via_cli]}, socket "
          f"{[round(x * 1000) for x in via_socket]}, plain {[round(x * 1000) for x in plain]})")


def density(base: Path, node: BenchNode, guests: int) -> None:
    idle = rss_mb(node.proc.pid)
    names = [f"g{i}" for i in range(guests)]

    def create(name: str) -> None:
        node.ask("vm.create", profile="tiny", name=name, vcpus=2, ram_mib=32, start=True)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(create, names))
    started = time.monotonic() - t0
    running = sum(asyncio.run(_status(node.audit(n))) == "running" for n in names)
    listed = node.ask("vm.list")
    pool_now = node.ask("vm.pool")
    time.sleep(2.0)
    lat: dict[str, list[float]] = {"vm.list": [], "vm.pool": []}
    for _ in range(200):
        for cmd in lat:
            t = time.perf_counter()
            node.ask(cmd)
            lat[cmd].append(time.perf_counter() - t)
    full = rss_mb(node.proc.pid)
    qemu_rss = statistics.median(rss_mb(v["pid"]) for v in listed[:16])
    print(f"\n2. {guests} guests x 2 vCPUs, 32 MiB each, TCG, on one node")
    print(f"   all started through pd-vmm        {started:7.1f} s    "
          f"({running}/{guests} say running on their audit socket; "
          f"pool: {pool_now['vcpus']['used']}/{pool_now['vcpus']['capacity']} vCPUs used)")
    for cmd, xs in lat.items():
        xs.sort()
        print(f"   {cmd} round trip                 p50 {xs[len(xs) // 2] * 1000:6.2f} ms, "
              f"p99 {xs[int(len(xs) * 0.99)] * 1000:6.2f} ms ({len(xs)} calls, all "
              f"{guests} running)")
    per = (full - idle) / guests
    goal = 48 + 0.25 * guests
    print(f"   node RSS: {idle:.1f} MB idle, {full:.1f} MB with {guests} guests "
          f"({per:.3f} MB per guest); goal < {goal:.0f} MB: "
          f"{'met' if full < goal else 'MISSED'}")
    print(f"   (a guest's QEMU itself: {qemu_rss:.1f} MB RSS, median of 16)")
    kill_with(str(node.state / "vms"))

    t0 = time.monotonic()
    procs = [direct(base, f"p{i}", 2, 32) for i in range(guests)]
    for _, audit in procs:
        poll_running(audit, 120)
    plain = time.monotonic() - t0
    print(f"   {guests} plain QEMUs, launched in a row   {plain:7.1f} s    "
          f"({started / plain:4.2f}x)")
    for p, _ in procs:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("vm bench skipped: no qemu-system-x86_64")
        return 0
    base = Path(tempfile.mkdtemp(prefix="ppn10b", dir="/tmp"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    print(f"vm bench at {head}, load {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs; state in {base}")
    node = None
    try:
        node = BenchNode(base)
        start_to_running(base, node, args.rounds)
        density(base, node, args.guests)
    finally:
        if node is not None:
            node.close()
        kill_with(str(base))
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
