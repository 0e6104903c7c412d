"""``python -m actors.mesh_demo DIR``: the three-node mesh, for real, on this machine.

``make run`` calls it.  As root with wireguard-go present it builds three network
namespaces (cloud, laptop-a, and laptop-b the hub) on one bridged underlay segment
(192.0.2.0/24, in a fourth namespace), initialises and runs a node in each, adds
each node's peers from the others' ``ppn node identity``, pings from one spoke to the
other through the hub, and shows ``ppn mesh status`` on each; then a disk-less guest is
created and started on cloud through pd-vmm, listed, and destroyed; then a fourth node
joins through the Genesis ceremony and pings every member.  Everything it made
(guests too: they outlive a node's process) is removed afterwards, also on Ctrl-C or
failure.  Otherwise it says why it cannot.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from actors import control
from actors.io import uapi

NODES = {  # name: (role, mesh IP, underlay IP)
    "laptop-b": ("hub", "10.8.0.1", "192.0.2.1"),
    "laptop-a": ("node", "10.8.0.2", "192.0.2.2"),
    "cloud": ("cloud", "10.8.0.3", "192.0.2.3"),
}
TOOLS = ("ip", "wireguard-go", "wg", "ping")


def missing() -> str | None:
    """Why the mesh cannot be built here, or None."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def _run(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def ppn(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ppn {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


def _answers(state: Path) -> bool:
    """Whether the node on ``state`` answers on its control socket (asked in-process: a
    ``ppn node status`` per poll would cost the starting nodes a Python start each)."""
    try:
        control.request(state, {"cmd": "status"}, timeout=2.0)
    except control.ControlError:
        return False
    return True


def wait_for(cond: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.1)


class DemoMesh:
    """The three namespaces and nodes; a context manager that always cleans up."""

    def __init__(self, directory: Path, prefix: str = "ppnrun", wait: bool = True,
                 by_ceremony: bool = False) -> None:
        """``wait``: enter only once every node answers (else see :meth:`wait_ready`).
        ``by_ceremony``: laptop-b founds the mesh and admits the other two through the
        Genesis ceremony (so every node is a member of every ledger), instead of peers
        added by hand."""
        self.directory, self.prefix, self._wait = directory, prefix, wait
        self.by_ceremony = by_ceremony
        self.switch = f"{prefix}sw"
        self.states: dict[str, Path] = {}
        self.started_at = 0.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.extra: list[str] = []  # nodes added to the three (add_waiting_node)

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name[-1]}"

    def iface(self, name: str) -> str:
        return f"{self.prefix}w{name[-1]}"  # the UAPI socket directory is shared

    def ping(self, name: str, ip: str, timeout: int = 2, record: bool = False) -> str | None:
        args = ["ip", "netns", "exec", self.ns(name), "ping", "-c", "1", "-W", str(timeout)]
        proc = subprocess.run([*args, *(["-R"] if record else []), ip], capture_output=True,
                              text=True)
        return proc.stdout if proc.returncode == 0 else None

    def dump(self, name: str) -> set[str]:
        out = _run("ip", "netns", "exec", self.ns(name), "wg", "show", self.iface(name), "dump")
        return {line.split("\t")[0] for line in out.splitlines()[1:]}

    def __enter__(self) -> DemoMesh:
        self.cleanup()
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        sw = self.switch
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for name, (role, mesh_ip, under) in NODES.items():
            n = self.ns(name)
            _run("ip", "netns", "add", n)
            _run("ip", "-n", n, "link", "set", "lo", "up")
            _run("ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name",
                 f"p{name[-1]}", "netns", sw)
            _run("ip", "-n", sw, "link", "set", f"p{name[-1]}", "master", "br0", "up")
            _run("ip", "-n", n, "addr", "add", f"{under}/24", "dev", "eth0")
            _run("ip", "-n", n, "link", "set", "eth0", "up")
            state = self.directory / name
            address = [] if self.by_ceremony and role != "hub" else ["--mesh-ip", mesh_ip]
            ppn("node", "init", "--state-dir", state, "--name", name, "--role", role,
                *address, "--endpoint", f"{under}:51820", "--interface",
                self.iface(name), "--listen-port", "51820")
            self.states[name] = state
        if self.by_ceremony:
            self.started_at = time.monotonic()
            for name in self.states:
                self.start(name)
            for name, (role, _, under) in NODES.items():
                if role != "hub":
                    self.pair(name, "laptop-b", f"{under}:7000")
            return
        ids = {name: json.loads(ppn("node", "identity", "--state-dir", s, "--json").stdout)
               for name, s in self.states.items()}
        for name, state in self.states.items():  # the hub peers with all; a spoke, the hub
            for other in NODES:
                if other != name and "hub" in (NODES[name][0], NODES[other][0]):
                    o = ids[other]
                    ppn("mesh", "peer", "add", "--state-dir", state, "--name", other,
                        "--wg-key", o["wg_public_key"], "--endpoint", o["endpoint"],
                        "--mesh-ip", o["mesh_ip"], "--role", o["role"], "--keepalive", "5")
        self.started_at = time.monotonic()  # the nodes start: what a cold start is timed from
        for name in self.states:
            self.start(name, wait=False)
        if self._wait:
            self.wait_ready()

    def add_waiting_node(self, name: str, underlay: str) -> Path:
        """A further namespace on the underlay, and a node in it initialised without a
        mesh address (waiting to be joined), running.  Its state directory."""
        n, sw = self.ns(name), self.switch
        if n in {self.ns(other) for other in self.states}:
            raise RuntimeError(f"{name}: its namespace name is taken")
        self.extra.append(name)
        _run("ip", "netns", "add", n)
        _run("ip", "-n", n, "link", "set", "lo", "up")
        _run("ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name",
             f"p{name[-1]}", "netns", sw)
        _run("ip", "-n", sw, "link", "set", f"p{name[-1]}", "master", "br0", "up")
        _run("ip", "-n", n, "addr", "add", f"{underlay}/24", "dev", "eth0")
        _run("ip", "-n", n, "link", "set", "eth0", "up")
        state = self.directory / name
        ppn("node", "init", "--state-dir", state, "--name", name, "--role", "node",
            "--endpoint", f"{underlay}:51820", "--interface", self.iface(name),
            "--listen-port", "51820")
        self.states[name] = state
        self.start(name)
        return state

    def pair(self, new: str, approver: str, listen: str) -> tuple[str, str, str]:
        """The Genesis ceremony: ``ppn pair`` on ``new`` (its code read from its output)
        and ``ppn pair approve --code -`` on ``approver``.  (The code, what ``ppn pair``
        printed, what ``ppn pair approve`` printed.)"""
        joiner = subprocess.Popen([sys.executable, "-m", "actors.cli", "pair", "--state-dir",
                                   str(self.states[new]), "--listen", listen],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert joiner.stdout is not None
        first = joiner.stdout.readline()
        if not first.startswith("pairing code: "):
            joiner.kill()
            raise RuntimeError(f"ppn pair: {first.strip() or joiner.stdout.read()[:300]}")
        code = first.split(": ", 1)[1].strip()
        approve = subprocess.run([sys.executable, "-m", "actors.cli", "pair", "approve",
                                  "--state-dir", str(self.states[approver]), "--code", "-",
                                  "--peer", listen], input=code + "\n", capture_output=True,
                                 text=True, timeout=90)
        rest = joiner.stdout.read()  # (not communicate(): it would lose what readline buffered)
        joiner.wait(90)
        if approve.returncode != 0 or joiner.returncode != 0:
            raise RuntimeError(f"pairing failed: {approve.stderr.strip() or rest.strip()}")
        return code, first + rest, approve.stdout

    def wait_ready(self) -> None:
        for state in self.states.values():
            wait_for(functools.partial(_answers, state))

    def handshaken(self) -> bool:
        """Whether every tunnel of every device has had a handshake (read over UAPI)."""
        for name in NODES:
            try:
                peers = uapi.get(uapi.socket_path(self.iface(name)), timeout=1.0).peers
            except uapi.UapiError:
                return False
            if not peers or not all(p.last_handshake > 0 for p in peers.values()):
                return False
        return True

    def start(self, name: str, wait: bool = True) -> None:
        """Run ``ppn node run`` for NAME in its namespace (again, after :meth:`kill`)."""
        log = (self.directory / f"{name}.log").open("ab")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), sys.executable, "-m", "actors.cli",
             "node", "run", "--state-dir", str(self.states[name])], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log)
        if wait:
            wait_for(functools.partial(_answers, self.states[name]))

    def kill(self, name: str) -> None:
        """kill -9 of NAME's ``ppn node run`` (its wireguard-go is left running)."""
        proc = self._procs.pop(name)
        proc.kill()
        proc.wait(10)

    def backend_pids(self, name: str) -> list[str]:
        return subprocess.run(["pgrep", "-f", f"wireguard-go -f {self.iface(name)}"],
                              capture_output=True, text=True).stdout.split()

    def __exit__(self, *exc: object) -> None:
        for p in self._procs.values():
            p.terminate()
        for p in self._procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in self._logs:
            log.close()
        self._procs, self._logs = {}, []
        self.cleanup()

    def guests(self) -> list[int]:
        """Pids of the QEMU guests of this mesh's nodes (they outlive a node's process)."""
        needle = f"unix:{self.directory}/".encode()
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def cleanup(self) -> None:
        for pid in self.guests():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in [*NODES, *self.extra]:
            subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {self.iface(name)}"],
                           capture_output=True)
            uapi.socket_path(self.iface(name)).unlink(missing_ok=True)
            subprocess.run(["ip", "netns", "del", self.ns(name)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


def guest_step(state: Path) -> None:
    """A disk-less guest created and started through pd-vmm, listed, and destroyed."""
    if shutil.which("qemu-system-x86_64") is None:
        print("\n(no qemu-system-x86_64 here: the guest step is skipped)")
        return
    for args in (("create", "--profile", "tiny", "--name", "demo-1", "--start"),
                 ("list",), ("pool",), ("destroy", "demo-1")):
        print(f"\n$ ppn vm {args[0]} --state-dir {state} {' '.join(args[1:])}   # cloud")
        print(ppn("vm", args[0], "--state-dir", state, *args[1:]).stdout.rstrip())


def genesis_step(mesh: DemoMesh) -> None:
    """A fourth node, waiting to be joined, joins through the Genesis ceremony (the code
    passed from ``ppn pair`` to ``ppn pair approve`` here, and shown), then pings every
    member over the tunnels."""
    new, under = "laptop-e", "192.0.2.5"
    state = mesh.add_waiting_node(new, under)
    print(f"\n{new} ({under}) initialised without a mesh address and running: it waits to "
          "be joined")
    print(f"$ ppn pair --state-dir {state} --listen {under}:7000   # {new}")
    print(f"$ ppn pair approve --state-dir {mesh.states['laptop-b']} --code - --peer "
          f"{under}:7000   # laptop-b, the code typed in")
    _, joiner, approver = mesh.pair(new, "laptop-b", f"{under}:7000")
    print("\n".join("  " + line for line in (joiner + approver).strip().splitlines()))
    for name, (_, ip, _) in NODES.items():
        wait_for(lambda ip=ip: mesh.ping(new, ip) is not None)  # type: ignore[misc]
        print(f"ping {new} -> {name} ({ip}): answered")


def main(argv: list[str]) -> int:
    why = missing()
    if why is not None:
        print(f"mesh demo skipped: {why}; the single node above is what this machine shows")
        return 0
    directory = Path(argv[0]) if argv else Path("mesh-demo")
    try:
        with DemoMesh(directory) as mesh:
            print("three nodes up: laptop-b (hub, 10.8.0.1), laptop-a (10.8.0.2), "
                  "cloud (10.8.0.3), each in its own network namespace")
            route = wait_for(lambda: mesh.ping("laptop-a", "10.8.0.3", record=True))
            print("ping laptop-a -> cloud (10.8.0.3) through the tunnels:")
            print("\n".join("  " + line for line in route.strip().splitlines()[:6]))
            for name, state in mesh.states.items():
                print(f"\n$ ppn mesh status --state-dir {state}   # {name}")
                print(ppn("mesh", "status", "--state-dir", state).stdout.rstrip())
            guest_step(mesh.states["cloud"])
            genesis_step(mesh)
    except KeyboardInterrupt:
        print("interrupted: the namespaces and processes were removed", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"mesh demo failed: {' '.join(str(exc).split())[:300]} (everything it made "
              "was removed)", file=sys.stderr)
        return 1
    print("\nthe namespaces, nodes, guests and wireguard-go processes are removed; ledgers "
          "kept in "
          f"{directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
