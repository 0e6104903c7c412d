"""The WireGuard mesh's benchmarks (issue 9), each beside the same thing done by hand.

Run as root with wireguard-go, wireguard-tools and iproute2:
``.venv/bin/python bench/mesh_bench.py``.  Namespaces use the prefix ``ppnbn`` and are
removed afterwards, also on failure.

1. Cold start: the three nodes started (``ppn node run`` in each namespace, peers in
   their ledgers) to a handshake on every tunnel, against the same three tunnels
   brought up by hand (``wireguard-go`` + ``wg set`` + ``ip``), the floor.  Goal <= 1.5x.
2. Drift repair: ``kill -9`` of a spoke's wireguard-go to a ping through its tunnel
   answering again.  Goal < 2 s.
3. Throughput: a TCP stream from a spoke to the hub through the tunnel, ppn-configured
   against hand-configured.  Goal 0.95-1.0x (wireguard-go is the data plane either way).
4. Idle RSS of each ``ppn node run`` with the mesh up, and of wireguard-go beside it.
   Goal: node <= 48 MB.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.mesh_demo import NODES, DemoMesh, missing

PREFIX = "ppnbn"
STREAM_BYTES = 64 << 20
ROUNDS = 5  # streams each way: one stream on 2 CPUs varies by +-10%


def sh(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def wait(cond, timeout: float = 60.0, step: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("timed out")
        time.sleep(step)
    return time.monotonic()


def by_hand(mesh: DemoMesh, keys: dict[str, tuple[str, str]]) -> float:
    """The same three tunnels with wireguard-go, wg and ip; seconds to every handshake."""
    t0 = time.monotonic()
    for name in NODES:
        ns, iface = mesh.ns(name), mesh.iface(name)
        subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", iface],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    for name, (role, mesh_ip, _under) in NODES.items():
        ns, iface = mesh.ns(name), mesh.iface(name)
        wait(lambda i=iface: Path(f"/var/run/wireguard/{i}.sock").exists(), 10, 0.005)
        priv = Path(tempfile.mktemp())
        priv.write_text(keys[name][0])
        args = ["wg", "set", iface, "private-key", str(priv), "listen-port", "51820"]
        for other, (orole, oip, ounder) in NODES.items():
            if other != name and "hub" in (role, orole):
                allowed = "10.8.0.0/24" if orole == "hub" else f"{oip}/32"
                args += ["peer", keys[other][1], "endpoint", f"{ounder}:51820",
                         "allowed-ips", allowed, "persistent-keepalive", "5"]
        sh("ip", "netns", "exec", ns, *args)
        priv.unlink()
        sh("ip", "-n", ns, "addr", "add", f"{mesh_ip}/24", "dev", iface)
        sh("ip", "-n", ns, "link", "set", iface, "up")
        if role == "hub":
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return wait(mesh.handshaken, step=0.005) - t0


def stream(mesh: DemoMesh, src: str, dst_ip: str) -> float:
    """MB/s of one TCP stream from ``src``'s namespace to a sink at ``dst_ip``."""
    dst = next(n for n, v in NODES.items() if v[1] == dst_ip)
    sink = subprocess.Popen(["ip", "netns", "exec", mesh.ns(dst), sys.executable, "-c",
                             "import socket; s=socket.socket(); s.setsockopt(1,2,1); "
                             f"s.bind(('{dst_ip}',5201)); s.listen(1); c,_=s.accept()\n"
                             "while c.recv(1<<20): pass"])
    time.sleep(0.5)
    code = (f"import socket,time; s=socket.create_connection(('{dst_ip}',5201)); "
            f"b=b'x'*(1<<20); t=time.monotonic()\nfor _ in range({STREAM_BYTES >> 20}): "
            "s.sendall(b)\ns.shutdown(1); s.recv(1); print(time.monotonic()-t)")
    out = sh("ip", "netns", "exec", mesh.ns(src), sys.executable, "-c", code)
    sink.wait(10)
    return STREAM_BYTES / float(out) / 1e6


def rss_kb(pattern: str) -> list[int]:
    pids = sh("pgrep", "-f", pattern).split()
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out.append(int(line.split()[1]))
    return out


def main() -> int:
    why = missing()
    if why is not None:
        print(f"mesh bench skipped: {why}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ppn-mesh-bench-"))
    print(f"mesh bench: 3 nodes, each in a namespace, one bridged underlay; work dir {work}")
    # Both sides are timed the same way: UAPI read in-process every 5 ms, from the
    # moment the processes are started, until every tunnel has had a handshake.
    with DemoMesh(work / "ppn", prefix=PREFIX, wait=False) as mesh:
        t = wait(mesh.handshaken, step=0.005) - mesh.started_at
        mesh.wait_ready()
        keys = {}
        for name, state in mesh.states.items():
            priv = (state / "wireguard.key").read_text().strip()
            pub = sh("sh", "-c", f"echo {priv} | wg pubkey").strip()
            keys[name] = (priv, pub)
        wait(lambda: mesh.ping("laptop-a", "10.8.0.3") is not None, 30)
        time.sleep(3)  # settle: then idle memory
        node_rss = rss_kb(f"node run --state-dir {work}/ppn")
        wg_rss = rss_kb(f"wireguard-go -f {PREFIX}w")
        t0 = time.monotonic()
        subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {mesh.iface('laptop-a')}"])
        back = wait(lambda: mesh.ping("laptop-a", "10.8.0.1", timeout=1) is not None, 30,
                    0.01) - t0
        tputs = [stream(mesh, "laptop-a", "10.8.0.1") for _ in range(ROUNDS)]
    with DemoMesh(work / "hand", prefix=PREFIX) as hand:
        for name in NODES:  # the same namespaces, with no node in them
            hand.kill(name)
        subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {PREFIX}w"])
        time.sleep(0.3)
        for name in NODES:
            Path(f"/var/run/wireguard/{hand.iface(name)}.sock").unlink(missing_ok=True)
            subprocess.run(["ip", "-n", hand.ns(name), "link", "del", hand.iface(name)],
                           capture_output=True)
        t_hand = by_hand(hand, keys)
        wait(lambda: hand.ping("laptop-a", "10.8.0.3") is not None, 30)
        hands = [stream(hand, "laptop-a", "10.8.0.1") for _ in range(ROUNDS)]
    tput, tput_hand = statistics.median(tputs), statistics.median(hands)
    print(f"1. cold start to a handshake on every tunnel: ppn {t:.2f} s vs by hand "
          f"{t_hand:.2f} s = {t / t_hand:.2f}x (goal <= 1.5x)")
    print(f"2. kill -9 of laptop-a's wireguard-go to a ping answering again: {back:.2f} s "
          "(goal < 2 s)")
    print(f"3. TCP through the tunnel laptop-a -> hub, {STREAM_BYTES >> 20} MiB: ppn "
          f"{tput:.1f} MB/s vs by hand {tput_hand:.1f} MB/s = {tput / tput_hand:.2f}x, medians "
          f"of {ROUNDS} (ppn {', '.join(f'{x:.1f}' for x in tputs)}; by hand "
          f"{', '.join(f'{x:.1f}' for x in hands)}) "
          "(goal 0.95-1.0x)")
    print(f"4. idle VmRSS with the mesh up: nodes {', '.join(f'{k / 1024:.1f}' for k in node_rss)}"
          f" MB (goal <= 48 MB each); wireguard-go {', '.join(f'{k / 1024:.1f}' for k in wg_rss)}"
          " MB")
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
